"""flash-attn-4's varlen kernel (`train.speed.attention_kernel=fa4`): chosen only where it can run, and on a GPU
that has it, the same numbers as FlashAttention-2's varlen kernel, eager and inside a compiled graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from ftpipe.errors import FtpipeError
from ftpipe.training import speed
from ftpipe.training.speed import attention as attn
from ftpipe.training.speed import fa4

GPU_FA4 = torch.cuda.is_available() and fa4.usable("cuda")


def test_fa4_is_refused_in_one_line_where_it_cannot_run() -> None:
    with pytest.raises(FtpipeError, match=r"train\.speed\.attention_kernel=fa4 needs .*device=cpu"):
        speed.resolve({"method": "lora", "speed": {"attention_kernel": "fa4"}}, "cpu")
    levers = speed.resolve({"method": "lora", "speed": {}}, "cpu")
    assert levers.attention_kernel == "fa2" and attn.attn_implementation(levers) == attn.DOCS


def test_fa4_lever_names_its_own_attention_implementation() -> None:
    fa4_levers = speed.Levers("cuda", "varlen", "off", True, True, "none", "bf16", attention_kernel="fa4")
    fa2_levers = speed.Levers("cuda", "varlen", "off", True, True, "none", "bf16")
    assert attn.attn_implementation(fa4_levers) == attn.VARLEN_FA4
    assert attn.attn_implementation(fa2_levers) == attn.VARLEN


def test_fa4_operators_describe_their_outputs_without_running() -> None:
    """What a compiled graph is traced with: the fake forward and backward give the kernels' shapes and dtypes
    (the log-sum-exp is [heads, tokens] fp32, as flash-attn-4 returns it for varlen)."""
    with FakeTensorMode():
        q = torch.empty(100, 8, 64, dtype=torch.bfloat16)
        k = v = torch.empty(100, 2, 64, dtype=torch.bfloat16)
        cu = torch.tensor([0, 30, 100], dtype=torch.int32)
        out, lse = fa4.varlen_forward(q, k, v, cu, 70, 0.125)
        dq, dk, dv = fa4.varlen_backward(out, q, k, v, out, lse, cu, 70, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (8, 100) and lse.dtype == torch.float32
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


def _packed(total: int = 3000, heads: int = 8, kv: int = 2, dim: int = 64):
    torch.manual_seed(0)
    cu = torch.tensor([0, 700, 1900, 2048, total], dtype=torch.int32, device="cuda")
    q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, kv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, kv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return q, k, v, cu, int((cu[1:] - cu[:-1]).max())


def _fa2(q, k, v, cu, max_len, scale) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return varlen_attn(q, kr, vr, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0))


@pytest.mark.skipif(not GPU_FA4, reason="needs flash-attn-4 and a GPU of compute capability 9.0+")
@pytest.mark.parametrize("compiled", [False, True])
def test_fa4_varlen_matches_flash_attention_2(compiled: bool) -> None:
    q, k, v, cu, max_len = _packed()
    grad = torch.randn_like(q)
    run = torch.compile(fa4.varlen_attention, fullgraph=True) if compiled else fa4.varlen_attention
    got = run(q, k, v, cu, max_len, 0.125)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want = _fa2(q, k, v, cu, max_len, 0.125)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip((got, *got_grads), (want, *want_grads), strict=True):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


def test_fa4_attention_gets_packed_tokens_and_grouped_heads_and_its_output_is_laid_out_back(
    monkeypatch,
) -> None:
    """The layout around the kernel, on the CPU: transformers' [B, H, T, D] in, flash-attn-4's [T, H, D] with
    K/V heads not repeated, [B, T, H, D] out; a stand-in kernel attends per document with sdpa."""
    seen = {}

    def per_document(q, k, v, cu, max_len, scale):
        seen.update(q=q.shape, k=k.shape, max_len=max_len)
        rep = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))
            ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
            out[a:b] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1)
        return out

    monkeypatch.setattr(fa4, "varlen_attention", per_document)
    torch.manual_seed(0)
    lengths = [5, 17, 10]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    q = torch.randn(1, 4, 32, 16)
    k, v = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    got, _ = attn.varlen_attention_forward(
        None, q, k, v, None, scaling=0.25, kernel="fa4", position_ids=positions
    )
    assert seen == {"q": (32, 4, 16), "k": (32, 2, 16), "max_len": 17}
    want = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[:, :, a:b],
                k[:, :, a:b].repeat_interleave(2, 1),
                v[:, :, a:b].repeat_interleave(2, 1),
                is_causal=True,
                scale=0.25,
            )
            for a, b in ((0, 5), (5, 22), (22, 32))
        ],
        dim=2,
    ).transpose(1, 2)
    torch.testing.assert_close(got, want)
