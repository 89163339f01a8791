"""CPU checks of the speed levers (ftpipe/training/speed/) that run without a GPU: per-document attention, the
fused loss, fused LoRA, checkpointing, padding-free batches. The CUDA-only parts (varlen kernel, Liger, offload,
compile) are checked by the correctness guard in scripts/bench.py on the GPU machine; tests marked with a
`cuda` case run there too (`pytest tests/training/test_speed.py`)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from ftpipe.data import boundaries
from ftpipe.data.labels import IGNORE_INDEX
from ftpipe.training import speed
from ftpipe.training.collator import PackedCollator
from ftpipe.training.speed import attention as attn
from ftpipe.training.speed import fa4, lora_ops, mlp_chunks, swiglu
from ftpipe.training.speed.host_embedding import HostEmbedding
from ftpipe.training.speed.lora import cast_adapters, fuse_lora
from ftpipe.training.speed.lora_ops import lora_linear
from ftpipe.training.speed.loss import ChunkedLinearCrossEntropy, linear_cross_entropy_sum
from ftpipe.training.speed.swiglu import GroupedSwiGLU, swiglu_backward

LENGTHS = [[5, 17, 10], [32]]  # two rows of 32 tokens: three documents, then one


def _positions() -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])


def _per_document_sdpa(q, k, v) -> torch.Tensor:
    """Reference: each document alone through SDPA (causal), grouped heads repeated."""
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)
    rep = q.shape[1] // k.shape[1]
    for b, row in enumerate(LENGTHS):
        start = 0
        for n in row:
            sl = slice(start, start + n)
            o = F.scaled_dot_product_attention(
                q[b, :, sl],
                k[b, :, sl].repeat_interleave(rep, 0),
                v[b, :, sl].repeat_interleave(rep, 0),
                is_causal=True,
            )
            out[b, sl] = o.transpose(0, 1)
            start += n
    return out


def test_document_boundaries() -> None:
    pos = _positions()
    cu, longest = boundaries.cu_seqlens(pos)
    assert cu.tolist() == [0, 5, 22, 32, 64] and longest == 32
    assert boundaries.document_ids(pos)[0].unique().tolist() == [0, 1, 2]


def test_flex_attention_matches_sdpa_per_document() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 4, 32, 16)
    k, v = torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    out, _ = attn.flex_attention_forward(None, q, k, v, None, scaling=16**-0.5, position_ids=_positions())
    torch.testing.assert_close(out, _per_document_sdpa(q, k, v), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_linear_cross_entropy_matches_full_logits(weight_grad: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(70, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 24, dtype=torch.float64, requires_grad=weight_grad)
    y = torch.randint(0, 50, (70,))
    y[::7] = IGNORE_INDEX
    loss = ChunkedLinearCrossEntropy.apply(x, w, None, y, 16) / (y != IGNORE_INDEX).sum()
    ref = F.cross_entropy(x @ w.T, y, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(3 * loss, [x, w] if weight_grad else [x])
    ref_grads = torch.autograd.grad(3 * ref, [x, w] if weight_grad else [x])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    assert linear_cross_entropy_sum(x, w, None, y, "torch").item() == pytest.approx(ref.item() * 60)


def test_lora_linear_fn_matches_autograd() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    w, bias = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    out = lora_linear(x, w, bias, [a], [b], [0.25])
    ref = F.linear(x, w, bias) + 0.25 * (x @ a.T) @ b.T
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for got, want in zip(
        torch.autograd.grad(out, (x, a, b), g), torch.autograd.grad(ref, (x, a, b), g), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_lora_linear_over_a_group_matches_autograd() -> None:
    """One operator for projections that read the same x (q/k/v): base weights concatenated along the outputs,
    each projection's own rank and scale; the same outputs and gradients as three separate LoRA linears."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    outs, ranks, scales = (8, 4, 4), (4, 2, 3), [0.25, 0.5, 2.0]
    ws = [torch.randn(n, 12, dtype=torch.float64) for n in outs]
    biases = [torch.randn(n, dtype=torch.float64) for n in outs]
    a = [torch.randn(r, 12, dtype=torch.float64, requires_grad=True) for r in ranks]
    b = [torch.randn(n, r, dtype=torch.float64, requires_grad=True) for n, r in zip(outs, ranks, strict=True)]
    out = lora_linear(x, torch.cat(ws), torch.cat(biases), a, b, scales)
    parts = zip(ws, biases, a, b, scales, strict=True)
    ref = torch.cat([F.linear(x, w, bias) + s * (x @ aa.T) @ bb.T for w, bias, aa, bb, s in parts], dim=-1)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for got, want in zip(
        torch.autograd.grad(out, (x, *a, *b), g), torch.autograd.grad(ref, (x, *a, *b), g), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_swiglu_backward_matches_autograd() -> None:
    """The SwiGLU product's backward over the grouped [gate | up] (speed/swiglu.py) is autograd's, for a group
    output that is a view with a row stride of its own."""
    torch.manual_seed(0)
    gate_up = torch.randn(3, 5, 16, dtype=torch.float64)[..., :12].requires_grad_()  # gate and up: 6 each
    grad = torch.randn(3, 5, 6, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    (want,) = torch.autograd.grad(F.silu(gate) * up, gate_up, grad)
    torch.testing.assert_close(swiglu_backward(gate_up.detach(), grad), want)
    out = GroupedSwiGLU.apply(gate_up)
    torch.testing.assert_close(out, F.silu(gate) * up)
    (got,) = torch.autograd.grad(out, gate_up, grad)
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
def test_swiglu_triton_backward_matches_the_fp32_formula() -> None:
    """On CUDA the backward is a Triton kernel: the formula's numbers (fp32 inside, rounded once to bf16), for
    a length that is no multiple of the kernel's block and a group output with a row stride of its own."""
    torch.manual_seed(0)
    gate_up = torch.randn(2, 37, 2 * 1500 + 8, device="cuda", dtype=torch.bfloat16)[..., : 2 * 1500]
    grad = torch.randn(2, 37, 1500, device="cuda", dtype=torch.bfloat16)
    assert swiglu._kernel is not None
    got = swiglu_backward(gate_up, grad)
    gate, up = gate_up.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    want = torch.cat([grad * up * sig * (1 + gate * (1 - sig)), grad * gate * sig], dim=-1)
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)
    assert got.dtype == torch.bfloat16 and got.shape == gate_up.shape


def test_grouped_siblings_keep_the_numbers_in_any_call_order() -> None:
    """q/k/v and gate/up grouped (`fuse_lora`): the base layers' weights become views of the group's one weight
    (no copy), and a member called with another input than its siblings, or before them, still gives its own
    projection (a member called with a new input computes the group again)."""
    fast = _tiny_peft(
        {"method": "lora", "precision": "fp32", "speed": {"fused_lora": "on", "attention": "sdpa"}}
    )
    plain = _tiny_peft(None)
    attn, ref = (
        fast.base_model.model.model.layers[0].self_attn,
        plain.base_model.model.model.layers[0].self_attn,
    )
    head = attn.q_proj
    weight = head._ftpipe_group_weight
    assert (
        attn.k_proj.get_base_layer().weight.data_ptr() == weight.data_ptr() + 64 * 64 * weight.element_size()
    )
    x, other = torch.randn(1, 6, 64), torch.randn(1, 6, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn.v_proj(x), ref.v_proj(x))  # v first: it computes the group
        torch.testing.assert_close(attn.k_proj(other), ref.k_proj(other))  # another input: its own numbers
        torch.testing.assert_close(attn.q_proj(x), ref.q_proj(x))  # a new input: the group again
        torch.testing.assert_close(attn.k_proj(x), ref.k_proj(x))
        assert head._ftpipe_pending[2] == (2,)  # v's columns wait
        torch.testing.assert_close(attn.v_proj(x), ref.v_proj(x))
    assert head._ftpipe_pending is None  # every member served: the group's output is let go


def test_grouped_siblings_keep_no_more_for_backward(monkeypatch) -> None:
    """Compiled layers with q/k/v and gate/up grouped save what single projections save: a member's output
    that a consumer keeps for backward (attention keeps v) must not keep the group's whole output alive."""
    from ftpipe.training.speed import lora as lora_lever

    # the partitioner inductor runs (min-cut, with the activation budget), without generating kernels
    monkeypatch.setattr(
        torch, "compile", functools.partial(torch.compile, backend="aot_eager_decomp_partition")
    )
    saved = []
    for siblings in ((), lora_lever.SIBLINGS):
        monkeypatch.setattr(lora_lever, "SIBLINGS", siblings)
        torch._dynamo.reset()
        speed_cfg = {"attention": "sdpa", "compile": "on", "fused_lora": "on"}
        model = _tiny_peft({"method": "lora", "precision": "fp32", "speed": speed_cfg})
        frozen = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        storages: dict[int, int] = {}

        def keep(t: torch.Tensor, frozen: set = frozen, storages: dict = storages) -> torch.Tensor:
            if (ptr := t.untyped_storage().data_ptr()) not in frozen:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 256, (1, 256))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(input_ids=ids, labels=ids, position_ids=torch.arange(256)[None])
        saved.append(sum(storages.values()))
    assert saved[1] <= saved[0], saved


@pytest.mark.parametrize("fused_swiglu", ["off", "on"])
def test_grouped_gate_up_are_saved_as_the_groups_output(fused_swiglu: str, monkeypatch) -> None:
    """The compiled MLP keeps its gate/up group's one output for the SwiGLU product's backward (as two views of
    it, or whole through speed/swiglu.py) and no copy of gate, of up or of their product (a pass over them per
    forward, memory for nothing), while attention's v stays a tensor of its own (a view would keep all of
    q/k/v alive)."""
    monkeypatch.setattr(
        torch, "compile", functools.partial(torch.compile, backend="aot_eager_decomp_partition")
    )
    torch._dynamo.reset()
    speed_cfg = {"attention": "sdpa", "compile": "on", "fused_lora": "on", "fused_swiglu": fused_swiglu}
    model = _tiny_peft({"method": "lora", "precision": "fp32", "speed": speed_cfg}, layers=1)
    intermediate, kv = model.config.intermediate_size, model.config.num_key_value_heads
    saved: list[torch.Tensor] = []
    ids = torch.randint(0, 256, (1, 64))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(input_ids=ids, labels=ids, position_ids=torch.arange(64)[None])
    halves = [t for t in saved if t.shape == (1, 64, intermediate)]
    whole = [t for t in saved if t.shape == (1, 64, 2 * intermediate)]
    kept = halves if fused_swiglu == "off" else whole
    assert len(kept) == (2 if fused_swiglu == "off" else 1) and len(halves) + len(whole) == len(kept)
    assert {t.untyped_storage().data_ptr() for t in kept} == {kept[0].untyped_storage().data_ptr()}
    assert kept[0].untyped_storage().nbytes() == 2 * intermediate * 64 * kept[0].element_size()
    values = [t for t in saved if t.dim() == 4 and t.shape[1] == kv]  # k and v, [1, kv heads, T, dim]
    assert values and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in values)


def _fused_qlora_layer(keep_dequant: bool = False, lora_dropout: float = 0.0, fuse: bool = True):
    """A PEFT LoRA layer over a bitsandbytes nf4 Linear4bit (double quant, CPU backend here), bf16 adapters,
    fused by `fuse_lora` as the train stage does (unless not `fuse`); and the dequantized base weight (fp32) for
    references."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(
        torch.randn(48, 64, dtype=torch.bfloat16),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
        blocksize=64,
    )
    model = torch.nn.Sequential()
    model.add_module("proj", base.to("cpu"))
    w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    lora = LoraConfig(
        r=4, lora_alpha=2, lora_dropout=lora_dropout, target_modules=["proj"], init_lora_weights=False
    )
    model = inject_adapter_in_model(lora, model)
    cast_adapters(model, torch.bfloat16)
    if not fuse:
        return model.proj, w
    assert fuse_lora(model, keep_dequant=keep_dequant) == 1
    layer = model.proj
    assert layer._ftpipe_nf4 is not None  # the nf4 operator path, not the bf16 one
    return layer, w


@pytest.mark.parametrize("keep,compiled", [(False, False), (True, False), (True, True)])
def test_lora_4bit_layer_with_dropout_matches_peft(keep: bool, compiled: bool) -> None:
    """QLoRA with LoRA dropout: the fused 4-bit base and PEFT's dropped-input adapter path give PEFT's output
    and gradients for the same random masks (same seed), also where the dequantized weight is kept, and
    compiled (both sides through AOTAutograd, whose dropout draws its masks its own way; with the partitioner's
    default budget, as another test's compiled layers may have left a lower one)."""
    import torch._functorch.config as functorch_config

    torch.manual_seed(1)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    g = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    results = []
    for fuse in (False, True):
        layer, _ = _fused_qlora_layer(keep_dequant=keep, lora_dropout=0.5, fuse=fuse)
        layer.train()
        xs = x.clone().requires_grad_()
        torch.manual_seed(3)
        with functorch_config.patch(activation_memory_budget=1.0):
            out = (torch.compile(layer, backend="aot_eager") if compiled else layer)(xs)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        results.append((out, *torch.autograd.grad(out, (xs, a, b), g)))
    for got, want in zip(results[1], results[0], strict=True):
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


def test_lora_4bit_layer_matches_dequantized_reference() -> None:
    """The QLoRA path: a fused LoRA layer over an nf4 weight against x W^T + s (x A^T) B^T with W dequantized."""
    layer, w = _fused_qlora_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = float(layer.scaling["default"])
    torch.manual_seed(1)
    x = torch.randn(2, 5, 64, requires_grad=True)
    a32, b32 = (t.detach().float().requires_grad_() for t in (a, b))
    ref = x @ w.T + scale * (x @ a32.T) @ b32.T
    xb = x.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", enabled=False):
        out = layer(xb)
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (xb, a, b), g.bfloat16())
    want = torch.autograd.grad(ref, (x, a32, b32), g)
    for gg, ww in zip(got, want, strict=True):
        assert ((gg.float() - ww).norm() / ww.norm()) < 2e-2


def test_grouped_4bit_siblings_match_their_own_projections(monkeypatch) -> None:
    """q/k/v over nf4 weights grouped: one dequantization of the concatenated packed data and block scales
    gives each projection the numbers (and gradients) it gives alone, and no 4-bit data is copied."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, inject_adapter_in_model

    from ftpipe.training.speed import lora as lora_lever

    def attention(group: bool) -> torch.nn.Module:
        monkeypatch.setattr(lora_lever, "SIBLINGS", siblings if group else ())
        torch.manual_seed(0)
        parent = torch.nn.Module()
        for name, rows in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
            base = bnb.nn.Linear4bit(64, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            base.weight = bnb.nn.Params4bit(
                torch.randn(rows, 64, dtype=torch.bfloat16),
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=True,
                blocksize=64,
            )
            parent.add_module(name, base.to("cpu"))
        torch.manual_seed(1)
        lora = LoraConfig(
            r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False
        )
        parent = inject_adapter_in_model(lora, parent)
        cast_adapters(parent, torch.bfloat16)
        assert fuse_lora(parent) == 3
        return parent

    siblings = lora_lever.SIBLINGS
    grouped, alone = attention(True), attention(False)
    assert "_ftpipe_members" in grouped.q_proj.__dict__ and "_ftpipe_members" not in alone.q_proj.__dict__
    packed = grouped.q_proj._ftpipe_group_weight
    assert grouped.v_proj.get_base_layer().weight.data_ptr() == packed.data_ptr() + (64 + 32) * 64 // 2
    torch.manual_seed(2)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    results = []
    for parent in (grouped, alone):
        xs = x.clone().requires_grad_()
        outs = [getattr(parent, n)(xs) for n in ("q_proj", "k_proj", "v_proj")]
        loss = sum((o.float() ** 2).sum() for o in outs)
        params = [p for n, p in sorted(parent.named_parameters()) if "lora_" in n]
        results.append((outs, torch.autograd.grad(loss, [xs, *params])))
    (outs, grads), (ref_outs, ref_grads) = results
    for got, want in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(got, want)  # the same dequantized rows, the same GEMMs per column
    for got, want in zip(grads, ref_grads, strict=True):  # dx: one bf16 GEMM over the group, not three summed
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


def test_4bit_siblings_with_dropout_are_fused_but_not_grouped() -> None:
    """With LoRA dropout each of q/k/v drops its own input for its adapter, so they are fused one by one: no
    group (a group runs one adapter GEMM over the shared input)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, inject_adapter_in_model

    parent = torch.nn.Module()
    for name, rows in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        base = bnb.nn.Linear4bit(64, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(
            torch.randn(rows, 64, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4", blocksize=64
        )
        parent.add_module(name, base.to("cpu"))
    lora = LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"])
    parent = inject_adapter_in_model(lora, parent)
    cast_adapters(parent, torch.bfloat16)
    assert fuse_lora(parent) == 3
    assert all("_ftpipe_head" not in getattr(parent, n).__dict__ for n in ("q_proj", "k_proj", "v_proj"))


def test_lora_ops_trace_under_compile() -> None:
    """The fused LoRA ops (torch.library registrations) trace through AOTAutograd with their fake kernels and
    autograd formulas: a compiled function gives the eager gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, requires_grad=True)
    w = torch.randn(8, 12)
    a = torch.randn(4, 12, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)

    def f(x, a, b):
        return (lora_linear(x, w, None, [a], [b], [0.3]) ** 2).sum()

    want = torch.autograd.grad(f(x, a, b), (x, a, b))
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x, a, b), (x, a, b))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


def test_lora_4bit_kept_weight_gives_the_same_gradients() -> None:
    """keep_dequant (a checkpoint's recompute): the dequantized weight is an output saved for backward instead of
    being dequantized again there; same values and gradients, eager and compiled."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)

    def run(keep: bool, compiled: bool) -> tuple:
        layer, _ = _fused_qlora_layer(keep_dequant=keep)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

        def f(x):
            return (layer(x).float() ** 2).sum()

        fn = torch.compile(f, backend="aot_eager") if compiled else f
        loss = fn(x)
        return (loss, *torch.autograd.grad(loss, (x, a, b)))

    want = run(False, False)
    for keep, compiled in ((True, False), (True, True), (False, True)):
        for g, r in zip(run(keep, compiled), want, strict=True):
            torch.testing.assert_close(g, r)


def test_an_unread_output_is_not_computed_and_its_gradients_are_the_same() -> None:
    """`unread` (an offloaded recompute of a layer's down projection): the base GEMM is skipped, and what the
    backward saves and returns is bit for bit the full forward's, bf16 and nf4, eager and compiled."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 12, dtype=torch.bfloat16)
    a = torch.randn(4, 12, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 7, 8, dtype=torch.bfloat16)

    def grads(unread: bool, compiled: bool) -> tuple:
        def f(x, a, b):
            return lora_linear(x, w, None, [a], [b], [0.3], unread)

        fn = torch.compile(f, backend="aot_eager", fullgraph=True) if compiled else f
        return torch.autograd.grad(fn(x, a, b), (x, a, b), grad)

    for unread, gemms in (
        (False, ["aten.mm.default"] * 2 + ["aten.addmm_.default"]),
        (True, ["aten.mm.default"]),
    ):
        ops: list[str] = []
        with _CountedOps(ops):
            lora_ops._lora_out(x.detach().view(-1, 12), w, None, [a], [b], [0.3], unread)
        assert [op for op in ops if "mm" in op] == gemms  # unread: x A^T only, no x W^T and no epilogue
    want = grads(False, False)
    for compiled in (False, True):
        for got, ref in zip(grads(True, compiled), want, strict=True):
            assert torch.equal(got, ref)

    layer, _ = _fused_qlora_layer(keep_dequant=True)
    qa, qb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    xq = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    gq = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    results = []
    for unread in (False, True):
        layer._ftpipe_output_unread = unread
        results.append(torch.autograd.grad(layer(xq), (xq, qa, qb), gq))
    for got, ref in zip(results[1], results[0], strict=True):
        assert torch.equal(got, ref)


class _CountedOps(TorchDispatchMode):
    """Records the name of every aten/ftpipe operator that runs under it."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_liger_chunks_are_few_and_bounded() -> None:
    """Chunk rows of the sync-free Liger loss: 512 for both bench shapes (Liger's own rule gives 256 and 128),
    never above the token count."""
    from ftpipe.training.speed.loss import _liger_chunk_rows

    assert _liger_chunk_rows(8192, 2048, 128256) == 512  # Llama-3.2-1B, 4 x 2048 tokens
    assert _liger_chunk_rows(4096, 3584, 152064) == 512  # Qwen2.5-7B, 2 x 2048 tokens
    assert _liger_chunk_rows(100, 2048, 128256) == 100
    assert _liger_chunk_rows(10**6, 4096, 32000) == 1024


def test_cpu_defaults_are_the_plain_path() -> None:
    levers = speed.resolve({"method": "lora", "speed": {}}, "cpu")
    # the frozen prefix is on (a no-op unless train.lora.last_layers leaves bottom layers frozen)
    assert levers == speed.Levers("cpu", "docs", "off", False, False, "none", "fp32", frozen_prefix=True)
    assert speed.loss_mode(levers) == "answer_only"  # fused_ce off: the answer-only LM head
    assert speed.collator_kwargs(levers) == {"boundaries": False, "host_ids": False, "row_index": True}
    assert speed.training_args_overrides(levers) == {} and speed.peft_kwargs(levers) == {}
    offload = speed.resolve({"method": "lora", "speed": {"checkpointing": "offload"}}, "cpu")
    assert offload.checkpointing == "full"
    train = {"micro_batch_size": 4, "grad_accum": 1}
    assert speed.micro_batches({**train, "speed": {"tokens_per_micro_batch": 4096}}, 2048) == (2, 2)
    assert speed.micro_batches({"micro_batch_size": 4, "grad_accum": 2, "speed": {}}, 2048) == (4, 2)


def test_checkpointing_and_loss_are_one_key_each() -> None:
    """`train.speed.checkpointing` alone switches checkpointing (auto = none, but offload for long CUDA
    micro-batches); the fused cross-entropy alone decides the loss path (on: the model computes it; off: the
    answer-only head)."""
    for device in ("cpu", "cuda"):
        assert speed.resolve({"method": "lora", "speed": {}}, device).checkpointing == "none"
        short = speed.resolve({"method": "lora", "speed": {}}, device, micro_batch_tokens=8192)
        assert short.checkpointing == "none"
    long_rows = {"method": "lora", "speed": {}}
    assert speed.resolve(long_rows, "cuda", micro_batch_tokens=131072).checkpointing == "offload"
    assert speed.resolve(long_rows, "cpu", micro_batch_tokens=131072).checkpointing == "none"
    explicit = {"method": "lora", "speed": {"checkpointing": "none"}}
    assert speed.resolve(explicit, "cuda", micro_batch_tokens=131072).checkpointing == "none"
    assert speed.resolve(long_rows, "cuda").mlp_chunk_tokens == 16384
    assert speed.resolve(long_rows, "cpu").mlp_chunk_tokens == 0
    assert speed.resolve({"method": "lora", "speed": {"checkpointing": "offload"}}, "cuda").checkpointing == (
        "offload"
    )
    cuda = speed.resolve({"method": "lora", "precision": "bf16", "speed": {}}, "cuda")
    assert cuda.fused_ce in ("liger", "torch") and speed.loss_mode(cuda) == "model"
    off = speed.resolve({"method": "lora", "speed": {"fused_ce": "off"}}, "cuda")
    assert speed.loss_mode(off) == "answer_only"


def test_fp32_training_on_cuda_avoids_the_bf16_only_varlen_kernel() -> None:
    # Resolving needs no GPU: the device is only a name here.
    assert speed.resolve({"method": "lora", "precision": "fp32", "speed": {}}, "cuda").attention == "sdpa"
    explicit = {"method": "lora", "precision": "fp32", "speed": {"attention": "varlen"}}
    assert speed.resolve(explicit, "cuda").attention == "sdpa"
    assert speed.resolve({"method": "lora", "precision": "bf16", "speed": {}}, "cuda").attention == "varlen"


def _tiny_peft(train_cfg: dict | None, before_peft=None, layers: int = 2, lora_dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    levers = speed.resolve(train_cfg, "cpu") if train_cfg else None
    kwargs = speed.model_load_kwargs(train_cfg, levers) if train_cfg else {"attn_implementation": "sdpa"}
    assert kwargs.pop("dtype", torch.float32) == torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, **kwargs)
    model.config.use_cache = False
    if train_cfg:
        model = speed.patch_model(model, train_cfg, levers)
    if before_peft is not None:
        before_peft(model)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules="all-linear", init_lora_weights=False
    )
    torch.manual_seed(1)
    model = get_peft_model(model, lora, **(speed.peft_kwargs(levers) if train_cfg else {}))
    if train_cfg:
        model = speed.after_peft(model, train_cfg, levers)
    return model


def _loss_grads(model, batch):
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "checkpointing,mlp_chunk,fused_swiglu",
    [
        ("none", 0, "off"),
        ("none", 0, "on"),
        ("full", 0, "off"),
        ("selective", 0, "on"),
        ("none", 16, "on"),
        ("full", 24, "on"),
    ],
)
def test_fast_path_matches_plain_path_on_tiny_llama(
    checkpointing: str, mlp_chunk: int, fused_swiglu: str, monkeypatch
) -> None:
    """Same weights, same packed batch: padding-free row + chunked fused loss + fused LoRA (+ checkpointing,
    + the MLP over chunks of the 64-token row, each recomputed on its own) give HF+PEFT's loss and LoRA
    gradients."""
    torch.manual_seed(2)
    pos = _positions()
    ids = torch.randint(0, 256, pos.shape)
    labels = ids.clone()
    labels[pos == 0] = IGNORE_INDEX
    labels[:, 3:12] = (
        IGNORE_INDEX  # prompt-like stretches: the fused loss then runs the head on trained tokens only
    )
    plain = _tiny_peft(None)
    ref_loss, ref_grads = _loss_grads(plain, {"input_ids": ids, "labels": labels, "position_ids": pos})
    train_cfg = {
        "method": "lora",
        "precision": "fp32",
        "speed": {
            "attention": "sdpa",  # flex has no CPU backward; sdpa masks per document from position_ids
            "fused_ce": "torch",
            "fused_lora": "on",
            "fused_swiglu": fused_swiglu,
            "checkpointing": checkpointing,
            "mlp_chunk_tokens": mlp_chunk,
        },
    }
    fast = _tiny_peft(train_cfg)
    chunked = 0

    def counting(*args, **kwargs):
        nonlocal chunked
        chunked += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(mlp_chunks, "checkpoint", counting)
    swiglu_backwards = []
    monkeypatch.setattr(
        swiglu, "swiglu_backward", lambda *a: swiglu_backwards.append(1) or swiglu_backward(*a)
    )
    rows = [{"input_ids": ids[i], "labels": labels[i], "position_ids": pos[i]} for i in range(2)]
    batch = PackedCollator(boundaries=True)(rows)
    assert batch["input_ids"].shape == (1, 64)
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 22, 32, 64] and batch["max_length_q"] == 64
    assert batch["loss_tokens"] == int((labels[:, 1:] != IGNORE_INDEX).sum())
    loss, grads = _loss_grads(fast, batch)
    # 2 layers x ceil(64 / chunk) chunks, each checkpointed (full checkpointing: again in the recompute)
    assert chunked == (
        0 if not mlp_chunk else 2 * -(-64 // mlp_chunk) * (2 if checkpointing == "full" else 1)
    )
    # with the key on, every MLP (every chunk of it) runs its gate/up group through the one-pass backward
    per_layer = -(-64 // mlp_chunk) if mlp_chunk else 1
    assert len(swiglu_backwards) == (2 * per_layer if fused_swiglu == "on" else 0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("fused_swiglu", ["off", "on"])
def test_compiled_layers_share_one_graph_with_their_mlps_chunked(fused_swiglu: str, monkeypatch) -> None:
    """Every decoder layer runs the same compiled graph: a wrapper dynamo guards by identity (a
    functools.partial per layer around the MLP) made one graph per layer, and the first layer's input, which
    needs no grad, one more."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # dynamo alone
    torch._dynamo.reset()
    counters.clear()  # (other tests' graphs)
    train_cfg = {
        "method": "lora",
        "precision": "fp32",
        "speed": {
            "attention": "sdpa",
            "compile": "on",
            "fused_lora": "on",
            "fused_swiglu": fused_swiglu,
            "mlp_chunk_tokens": 16,
        },
    }
    model = _tiny_peft(train_cfg, layers=4)
    ids = torch.randint(0, 256, (1, 12))  # shorter than a chunk: the plain MLP, traced into the graph
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(12)[None]}
    loss, grads = _loss_grads(model, batch)
    assert counters["stats"]["unique_graphs"] == 1
    # the first layer's input made to need grad changes no number
    ref_loss, ref_grads = _loss_grads(_tiny_peft(None, layers=4), batch)
    torch.testing.assert_close(loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_host_embedding_gathers_on_the_host() -> None:
    """QLoRA's frozen input embedding kept in host memory: same rows as the GPU table would give, from the
    collator's host copy of the ids when there is one."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8)
    emb.weight.requires_grad_(False)
    host = HostEmbedding(emb)
    ids = torch.randint(0, 50, (1, 12))
    batch = PackedCollator(host_ids=True)(
        [{"input_ids": ids[0], "labels": ids[0], "position_ids": torch.arange(12)}]
    )
    assert batch["host_input_ids"].tensor.tolist() == ids.tolist()
    host.pending = batch["host_input_ids"].tensor
    torch.testing.assert_close(host(ids), emb(ids))
    assert host.pending is None
    torch.testing.assert_close(host(ids), emb(ids))  # no host copy: read back from the ids' device


def test_quiet_gc_callback_restores_collection() -> None:
    import gc

    assert speed.callbacks(speed.resolve({"method": "lora", "speed": {}}, "cpu")) == []
    (cb,) = speed.callbacks(speed.resolve({"method": "lora", "speed": {}}, "cuda"))

    class State:
        global_step = 50

    cb.on_train_begin(None, State, None)
    assert not gc.isenabled()
    cb.on_step_end(None, State, None)
    cb.on_train_end(None, State, None)
    assert gc.isenabled()


def test_speed_keys_are_validated_by_name() -> None:
    from ftpipe.config import compose, validate
    from ftpipe.errors import FtpipeError

    cfg = validate(
        compose(["+recipe=colorist_lora", "train.speed.attention=flex", "train.speed.activation_budget=0.7"])
    )
    assert cfg["train"]["speed"]["attention"] == "flex" and cfg["train"]["speed"]["activation_budget"] == 0.7
    with pytest.raises(FtpipeError, match=r"train\.speed\.checkpointing"):
        validate(compose(["+recipe=colorist_lora", "train.speed.checkpointing=sometimes"]))


def test_compiled_layers_are_generic_in_the_length_from_the_first_call() -> None:
    """dynamic_in_length: a second sequence length runs the graph the first compiled (no recompilation), with
    the hidden states, a (cos, sin) pair and a [T, T] mask all as long as the sequence."""
    from torch._dynamo.utils import counters

    from ftpipe.training.speed.compiled import dynamic_in_length

    def layer(hidden, position_embeddings, attention_mask):
        cos, sin = position_embeddings
        mixed = torch.softmax(attention_mask, dim=-1) @ hidden[0]
        return hidden * cos + mixed[None] * sin

    torch._dynamo.reset()
    counters.clear()
    run = dynamic_in_length(torch.compile(layer, backend="aot_eager"))
    for tokens in (16, 24, 40):
        hidden = torch.randn(1, tokens, 8)
        rope = (torch.randn(1, tokens, 8), torch.randn(1, tokens, 8))
        mask = torch.randn(tokens, tokens)
        torch.testing.assert_close(
            run(hidden, position_embeddings=rope, attention_mask=mask), layer(hidden, rope, mask)
        )
    assert counters["stats"]["unique_graphs"] == 1


def test_a_warm_start_loads_its_compiled_graphs_without_the_worker_pool(tmp_path, monkeypatch) -> None:
    """compiled_mark: one mark per set of graphs (another micro-batch shape or lever is another mark); where
    it exists, inductor's compile-worker pool is off for the run, unless the user set the thread count."""
    import torch._inductor.config as inductor_config

    from ftpipe.training.speed import compiled

    train_cfg = {"method": "lora", "lora": {"r": 64}, "speed": {"compile": "on"}}
    levers = speed.resolve(train_cfg, "cpu")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')

    def mark_of(**change):
        args = {
            "levers": levers,
            "train_cfg": train_cfg,
            "micro_batch": (4, 2048),
            "precision": "bf16",
            **change,
        }
        return compiled.compiled_mark(tmp_path / "build", model_dir=model, **args)

    mark = mark_of()
    assert mark == mark_of() and mark.parent == tmp_path / "build" / compiled.COMPILED_MARKS
    assert mark != mark_of(micro_batch=(4, 1024))
    assert mark != mark_of(train_cfg={**train_cfg, "lora": {"r": 16}})
    assert mark != mark_of(levers=speed.resolve({**train_cfg, "speed": {"checkpointing": "full"}}, "cpu"))
    (model / "config.json").write_text('{"hidden_size": 128}')
    assert mark != mark_of()

    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(inductor_config, "compile_threads", 8)
    assert not compiled.load_compiled_in_process(mark) and inductor_config.compile_threads == 8  # cold
    mark.parent.mkdir(parents=True)
    mark.touch()
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "4")
    assert not compiled.load_compiled_in_process(mark) and inductor_config.compile_threads == 8  # user's
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")
    assert compiled.load_compiled_in_process(mark) and inductor_config.compile_threads == 1


def test_a_row_that_is_one_long_document_takes_the_single_document_kernel(monkeypatch) -> None:
    """One document spanning the row (cu_seq_lens of two entries, a shape: no host sync) and at least
    LONG_DOCUMENT tokens: the cuDNN path; a row of several documents never (their attention must not mix)."""
    calls: list[str] = []
    monkeypatch.setattr(attn, "LONG_DOCUMENT", 32)
    monkeypatch.setattr(
        attn, "_one_long_document", lambda q, k, v, s, kernel: calls.append("one") or q.transpose(1, 2)
    )

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append("varlen")
        return q

    monkeypatch.setattr(attn, "_varlen_fn", lambda: (fake_varlen, {"window_size": (-1, 0)}, True))
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
    for cu in ([0, 64], [0, 20, 64]):
        attn.varlen_attention_forward(None, q, k, k, None, cu_seq_lens_q=torch.tensor(cu), max_length_q=64)
    short = torch.randn(1, 4, 16, 8)
    attn.varlen_attention_forward(
        None, short, short, short, None, cu_seq_lens_q=torch.tensor([0, 16]), max_length_q=16
    )
    assert calls == ["one", "varlen", "varlen"]


GPU_FA4 = torch.cuda.is_available() and fa4.usable("cuda")


def _stand_in_fa4(monkeypatch) -> None:
    """flash-attn-4's operators replaced by plain attention over one document, in its layout (q [T, H, D], K/V
    heads not repeated, log-sum-exp [H, T]), so its path runs on the CPU."""

    def forward(q, k, v, cu, max_len, scale):
        assert cu.tolist() == [0, q.shape[0]] and max_len == q.shape[0]
        rep = q.shape[1] // k.shape[1]
        qh, kh, vh = (
            t.transpose(0, 1) for t in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        )
        future = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1)
        scores = (qh @ kh.transpose(1, 2) * scale).masked_fill(future, float("-inf"))
        return (scores.softmax(-1) @ vh).transpose(0, 1), scores.logsumexp(-1)

    def backward(grad, q, k, v, out, lse, cu, max_len, scale):
        assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            return torch.autograd.grad(forward(*inputs, cu, max_len, scale)[0], inputs, grad)

    monkeypatch.setattr(fa4, "varlen_forward", forward)
    monkeypatch.setattr(fa4, "varlen_backward", backward)


@pytest.mark.parametrize(
    ("device", "kernel"),
    [
        ("cpu", "fa2"),
        ("cpu", "fa4"),
        pytest.param(
            "cuda", "fa2", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
        ),
        pytest.param(
            "cuda", "fa4", marks=pytest.mark.skipif(not GPU_FA4, reason="needs flash-attn-4, sm90+")
        ),
    ],
)
def test_offloaded_checkpoint_replays_the_kept_attention_output(
    device: str, kernel: str, monkeypatch
) -> None:
    """Over one long document a checkpointed layer's recompute takes the attention output kept from its first
    forward: one attention forward per layer a step instead of two, and the same loss and gradients as plain
    autograd. Over the keeper's budget a layer recomputes its attention (still the same gradients). On the GPU:
    cuDNN's or flash-attn-4's kernels, layer inputs and kept outputs parked in pinned host memory; on the CPU
    flash-attn-4's layout runs with a stand-in kernel."""
    from ftpipe.training.speed import checkpointing as ckpt

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if kernel == "fa4" and not cuda:
        _stand_in_fa4(monkeypatch)

    calls: list[int] = []
    run_kernel = attn._attention_kernel
    monkeypatch.setattr(attn, "_attention_kernel", lambda *a, **k: calls.append(1) or run_kernel(*a, **k))
    torch.manual_seed(0)
    heads, kv_heads, dim, tokens, layers = (4, 2, 64, 256, 3) if cuda else (4, 2, 8, 48, 3)  # cuDNN: dims 64+
    width = (heads + 2 * kv_heads) * dim
    projections = [torch.nn.Linear(heads * dim, width, device=device, dtype=dtype) for _ in range(layers)]
    offloader = (lambda: ckpt.ActivationOffloader()) if cuda else (lambda: None)  # noqa: E731

    def layer(i: int, h: torch.Tensor) -> torch.Tensor:
        q, k, v = projections[i](h).view(1, tokens, -1, dim).split([heads, kv_heads, kv_heads], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = attn._one_long_document(q, k, v, dim**-0.5, kernel)
        return h + out.reshape(1, tokens, heads * dim)

    def loss_and_grads(keeper: ckpt.AttentionKeeper | None, checkpointed: bool) -> tuple:
        for p in (p for m in projections for p in m.parameters()):
            p.grad = None
        h = torch.randn(1, tokens, heads * dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        anchor = torch.zeros((), requires_grad=True)
        if keeper is not None:
            keeper.reset()
        parked = offloader()
        for i in range(layers):
            run = lambda x, i=i: layer(i, x)  # noqa: E731
            h = (
                ckpt.OffloadedCheckpoint.apply(run, parked, keeper, False, h, anchor)
                if checkpointed
                else run(h)
            )
        loss = h.pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for m in projections for p in m.parameters()]

    def assert_same(grads: list[torch.Tensor], want: list[torch.Tensor]) -> None:
        for g, ref in zip(grads, want, strict=True):
            if kernel == "fa4" and cuda:  # its backward sums dq with atomics: not bit-reproducible
                assert float((g.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
            else:
                torch.testing.assert_close(g, ref)

    plain_loss, plain_grads = loss_and_grads(None, checkpointed=False)
    calls.clear()
    loss, grads = loss_and_grads(ckpt.AttentionKeeper(offloader(), layers, budget=10**9), checkpointed=True)
    assert len(calls) == layers  # each layer's attention ran forward once; backward used the kept output
    torch.testing.assert_close(loss, plain_loss)
    assert_same(grads, plain_grads)
    out_bytes = tokens * heads * dim * dtype.itemsize
    calls.clear()
    keeper = ckpt.AttentionKeeper(offloader(), layers, budget=(layers + 1) * out_bytes)
    loss, grads = loss_and_grads(keeper, checkpointed=True)
    assert len(calls) == layers + (layers - 1)  # only the first layer's output fitted the budget
    assert_same(grads, plain_grads)
    calls.clear()
    loss_and_grads(None, checkpointed=True)  # no keeper: every layer recomputes its attention
    assert len(calls) == 2 * layers


def test_one_long_document_through_fa4_matches_sdpa(monkeypatch) -> None:
    """flash-attn-4's single-document path (stand-in kernel, its layout) gives sdpa's causal attention and
    gradients, with grouped K/V heads handed over unrepeated."""
    _stand_in_fa4(monkeypatch)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 40, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, 40, 4, 8)
    got = attn._one_long_document(q, k, v, None, "fa4")
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    ).transpose(1, 2)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.skipif(not GPU_FA4, reason="needs flash-attn-4 and a GPU of compute capability 9.0+")
def test_one_long_document_fa4_matches_cudnn() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 8, 20000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(1, 2, 20000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv"
    )
    grad = torch.randn(1, 20000, 8, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for kernel in ("fa2", "fa4"):
        out = attn._one_long_document(q, k, v, 0.125, kernel)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*results, strict=True):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


class _HostParking:
    """ActivationOffloader's interface without CUDA streams: tensors stay where they are."""

    def reset(self) -> None:
        pass

    def save(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def load(self, slot: torch.Tensor, device: torch.device) -> torch.Tensor:
        return slot


@pytest.mark.parametrize(
    "compiled,mlp_chunk,fused_swiglu",
    [(False, 0, False), (True, 0, False), (False, 16, False), (False, 0, True)],
)
def test_offloaded_recompute_skips_the_unread_down_projection(
    compiled: bool, mlp_chunk: int, fused_swiglu: bool, monkeypatch
) -> None:
    """Fused LoRA under offloaded checkpointing (the parking made host-only, so it runs on the CPU), eager, in
    compiled layers (AOTAutograd, one graph for the checkpoint's forward and one for the recompute, shared by
    the layers), with the MLP over checkpointed chunks or as the fused SwiGLU: each layer's recompute runs its
    down projection as the unread operator, and loss and gradients are bit for bit those of the same model
    computing that output (and HF + PEFT's, to rounding)."""
    from torch._dynamo.utils import counters

    from ftpipe.training.speed import checkpointing as ckpt
    from ftpipe.training.speed.policy import Levers

    monkeypatch.setattr(ckpt, "ActivationOffloader", _HostParking)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    pos = torch.arange(48)[None]
    batch = {"input_ids": torch.randint(0, 256, (1, 48)), "position_ids": pos}
    batch["labels"] = batch["input_ids"]
    train_cfg = {"method": "lora", "precision": "fp32", "speed": {}}

    def fused(skip: bool):
        levers = Levers(
            "cpu",
            "sdpa",
            "off",
            compiled,
            True,
            "offload",
            "fp32",
            fused_swiglu=fused_swiglu,
            skip_unread_output=skip,
        )
        chunked = (lambda m: mlp_chunks.chunk_mlps(m, mlp_chunk)) if mlp_chunk else None
        return speed.after_peft(_tiny_peft(None, chunked), train_cfg, levers)

    ref_loss, ref_grads = _loss_grads(_tiny_peft(None), batch)
    full_loss, full_grads = _loss_grads(fused(False), batch)
    torch._dynamo.reset()
    counters.clear()
    unread_calls = []
    forward = lora_ops._lora_fwd_impl
    monkeypatch.setattr(
        lora_ops,
        "_lora_fwd_impl",
        lambda *a, unread=False: unread_calls.append(unread) or forward(*a, unread),
    )
    loss, grads = _loss_grads(fused(True), batch)
    # one per layer (its down projection, in its recompute); chunked, once per chunk in the recompute and again
    # in the chunk's own recompute
    assert unread_calls.count(True) == (2 * 3 * 2 if mlp_chunk else 2)
    assert counters["stats"]["unique_graphs"] == (2 if compiled else 0)
    assert torch.equal(loss, full_loss) and set(grads) == set(full_grads) == set(ref_grads)
    for name, g in grads.items():
        assert torch.equal(g, full_grads[name]), name
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert speed.resolve({"method": "lora", "speed": {"checkpointing": "offload"}}, "cuda").skip_unread_output
    for other in ({"checkpointing": "full"}, {"checkpointing": "offload", "skip_unread_output": "off"}):
        assert not speed.resolve({"method": "lora", "speed": other}, "cuda").skip_unread_output


def test_projections_that_cannot_fuse_are_named_in_the_log(caplog) -> None:
    """LoRA dropout above 0 over a 16-bit base keeps PEFT's own forward: the run says so, once per reason, with
    how many projections."""
    model = _tiny_peft(None, lora_dropout=0.1)
    with caplog.at_level("INFO", logger="ftpipe"):
        assert fuse_lora(model) == 0
    assert (
        "14 LoRA projections keep PEFT's own forward, not the fused one: LoRA dropout 0.1 over a 16-bit"
        in (caplog.text)
    )
    with caplog.at_level("INFO", logger="ftpipe"):
        caplog.clear()
        assert fuse_lora(_tiny_peft(None)) == 14
    assert "PEFT's own forward" not in caplog.text


@pytest.mark.parametrize("compiled", [False, True])
def test_offloaded_recompute_draws_the_dropout_masks_of_its_forward(compiled: bool, monkeypatch) -> None:
    """LoRA dropout under offloaded checkpointing, eager or in compiled layers (AOTAutograd): the recompute
    starts from the random state of the layer's forward, so the gradients are those of the masks the forward
    used (the plain model's, same seed), and the state after the step is the plain model's too. Layers without
    dropout stash nothing."""
    from ftpipe.training.speed import checkpointing as ckpt
    from ftpipe.training.speed.policy import Levers

    monkeypatch.setattr(ckpt, "ActivationOffloader", _HostParking)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    levers = Levers("cpu", "sdpa", "off", compiled, False, "offload", "fp32")
    batch = {"input_ids": torch.randint(0, 256, (1, 48)), "position_ids": torch.arange(48)[None]}
    batch["labels"] = batch["input_ids"]
    results = []
    for checkpointed in (False, True):
        model = _tiny_peft(None, lora_dropout=0.3)
        if checkpointed:  # after PEFT, as the train stage wraps them: LoRA's dropouts are in the layers then
            model = speed.after_peft(model, {"method": "lora", "precision": "fp32"}, levers)
        model.train()
        torch.manual_seed(5)
        results.append((*_loss_grads(model, batch), torch.rand(1)))
    (ref_loss, ref_grads, ref_next), (loss, grads, after) = results
    torch.testing.assert_close(loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(after, ref_next)  # the recompute left the random stream where the plain step did
    assert ckpt.draws_random(model.base_model.model.model.layers[0])
    assert not ckpt.draws_random(_tiny_peft(None).base_model.model.model.layers[0])


def test_offloaded_checkpointing_wraps_the_layers_of_a_model(monkeypatch) -> None:
    """`wrap_layers` in offload mode on a whole model (the parking made host-only, so it runs on the CPU): the
    stack's new-step hook, every layer's checkpoint and recompute give the plain model's loss and gradients."""
    from ftpipe.training.speed import checkpointing as ckpt
    from ftpipe.training.speed.policy import Levers

    monkeypatch.setattr(ckpt, "ActivationOffloader", _HostParking)
    levers = Levers("cpu", "sdpa", "off", False, False, "offload", "fp32")
    pos = torch.arange(48)[None]
    batch = {"input_ids": torch.randint(0, 256, (1, 48)), "position_ids": pos}
    batch["labels"] = batch["input_ids"]
    ref_loss, ref_grads = _loss_grads(_tiny_peft(None), batch)
    recomputed: list[int] = []
    backward = ckpt.OffloadedCheckpoint.backward
    monkeypatch.setattr(ckpt.OffloadedCheckpoint, "backward", lambda *a: recomputed.append(1) or backward(*a))
    loss, grads = _loss_grads(_tiny_peft(None, lambda m: ckpt.wrap_layers(m, levers)), batch)
    assert len(recomputed) == 2  # both layers went through the checkpoint
    torch.testing.assert_close(loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
