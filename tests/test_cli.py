"""The `ftpipe` command as a user runs it: separate processes, a fresh cache, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FTPIPE = [sys.executable, "-m", "ftpipe.cli"]


def ftpipe(*args: str, cwd: Path, cache: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "FTPIPE_CACHE": str(cache), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [*FTPIPE, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )


def run_json(cwd: Path) -> dict:
    found = sorted(cwd.glob("outputs/*/*/run.json"))
    assert found, "no run.json written"
    return json.loads(found[-1].read_text())


def test_ls_lists_recipes_and_groups(tmp_path):
    out = ftpipe("ls", cwd=tmp_path, cache=tmp_path / "c").stdout
    for recipe in ("colorist_lora", "colorist_qlora", "assistant_lora", "assistant_qlora"):
        assert recipe in out
    assert "tiny_llama" in out and "smollm2_135m" in out


def test_cp_then_run_the_copy_with_the_printed_command(tmp_path):
    cache = tmp_path / "c"
    res = ftpipe("cp", "recipe/colorist_lora", "my_conf", "--name", "mine", cwd=tmp_path, cache=cache)
    assert res.returncode == 0, res.stderr
    copy = tmp_path / "my_conf" / "recipe" / "mine.yaml"
    assert copy.read_text().splitlines()[1] == f"# ftpipe --config-dir {tmp_path / 'my_conf'} +recipe=mine"
    again = ftpipe("cp", "recipe/colorist_lora", "my_conf", "--name", "mine", cwd=tmp_path, cache=cache)
    assert again.returncode != 0 and "not overwriting" in again.stderr
    show = ftpipe(
        "show", "--config-dir", "my_conf", "+recipe=mine", "model=tiny_llama", cwd=tmp_path, cache=cache
    )
    assert show.returncode == 0, show.stderr
    assert "download" in show.stdout and "miss" in show.stdout


def test_unknown_key_fails_before_any_stage_and_names_it(tmp_path):
    cache = tmp_path / "c"
    res = ftpipe("+recipe=colorist_lora", "model=tiny_llama", "optimizer.lrr=1", cwd=tmp_path, cache=cache)
    assert res.returncode != 0
    assert "optimizer.lrr" in res.stdout + res.stderr
    assert not (cache / "download").exists()


def test_download_materialises_then_hits(tmp_path):
    cache = tmp_path / "c"
    args = ("+recipe=colorist_lora", "model=tiny_llama", "stages=[download]")
    first = ftpipe(*args, cwd=tmp_path, cache=cache)
    assert first.returncode == 0, first.stderr
    (row,) = run_json(tmp_path)["stages"]
    assert row["name"] == "download" and row["hit"] is False
    assert (row["rows_train"], row["rows_eval"]) == (889, 60)
    out = Path(row["output"])
    assert (out / "manifest.json").is_file() and (out / "model" / "model.safetensors").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(out / "model")("#ff0000").input_ids

    show = ftpipe("show", *args, cwd=tmp_path, cache=cache)
    assert f"{row['key']}  hit" in show.stdout

    for p in tmp_path.glob("outputs/*/*/run.json"):
        p.unlink()
    second = ftpipe(*args, cwd=tmp_path, cache=cache)
    assert second.returncode == 0, second.stderr
    (again,) = run_json(tmp_path)["stages"]
    assert again["hit"] is True and again["key"] == row["key"]


def test_offline_hub_model_gives_a_clear_error_and_no_entry(tmp_path):
    cache = tmp_path / "c"
    res = ftpipe(
        "model.path=someorg/some-model",
        "stages=[download]",
        cwd=tmp_path,
        cache=cache,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode != 0
    assert "offline" in res.stdout + res.stderr and "someorg/some-model" in res.stdout + res.stderr
    assert not any((cache / "download").glob("*/manifest.json"))


def test_local_dataset_edit_changes_the_download_key(tmp_path):
    cache = tmp_path / "c"
    data = tmp_path / "mine.jsonl"
    data.write_text('{"instruction": "hi", "input": "", "output": "hello"}\n')
    args = ("model=tiny_llama", f"dataset.path={data}", "dataset.format=alpaca", "dataset.eval_size=0")
    key1 = ftpipe("show", *args, cwd=tmp_path, cache=cache).stdout.split("download")[-1].split()[0]
    data.write_text('{"instruction": "hi", "input": "", "output": "hey"}\n')
    key2 = ftpipe("show", *args, cwd=tmp_path, cache=cache).stdout.split("download")[-1].split()[0]
    assert key1 != key2


def test_installed_wheel_carries_configs_and_recipes(tmp_path):
    """A non-editable install must find `+recipe=NAME` from any directory."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.fail(res.stderr[-2000:])
    (wheel,) = tmp_path.glob("ftpipe-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "ftpipe" / "conf" / "recipe" / "colorist_lora.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import ftpipe.paths as p, ftpipe.config as c; print(p.CONF_DIR); print(c.validate(c.compose(['+recipe=assistant_lora']))['dataset']['path'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    conf_dir, dataset = out.stdout.split()
    assert conf_dir == str(site / "ftpipe" / "conf") and dataset == "embedded:assistant"
