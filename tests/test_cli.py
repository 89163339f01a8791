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
    assert not cache.exists() or not any(cache.iterdir())


def test_download_materialises_model_and_data_as_separate_entries_then_hits(tmp_path):
    cache = tmp_path / "c"
    args = ("+recipe=colorist_lora", "model=tiny_llama", "stages=[download]")
    first = ftpipe(*args, cwd=tmp_path, cache=cache)
    assert first.returncode == 0, first.stderr
    model_row, data_row = run_json(tmp_path)["stages"]
    assert (model_row["name"], data_row["name"]) == ("download-model", "download-data")
    assert not model_row["hit"] and not data_row["hit"]
    assert (data_row["rows_train"], data_row["rows_eval"]) == (889, 60)
    model_dir = Path(model_row["output"]) / "model"
    assert (Path(model_row["output"]) / "manifest.json").is_file() and (
        model_dir / "model.safetensors"
    ).is_file()
    assert (Path(data_row["output"]) / "data" / "split.json").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(model_dir)("#ff0000").input_ids

    show = ftpipe("show", *args, cwd=tmp_path, cache=cache)
    assert f"{model_row['key']}  hit" in show.stdout and f"{data_row['key']}  hit" in show.stdout

    for p in tmp_path.glob("outputs/*/*/run.json"):
        p.unlink()
    # another dataset: only the data is fetched again, the model entry is reused
    second = ftpipe(*args, "dataset.eval_size=10", cwd=tmp_path, cache=cache)
    assert second.returncode == 0, second.stderr
    model_again, data_again = run_json(tmp_path)["stages"]
    assert model_again["hit"] is True and model_again["key"] == model_row["key"]
    assert data_again["hit"] is False and data_again["rows_eval"] == 10


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
    assert not any((cache / "download-model").glob("*/manifest.json"))


def test_local_dataset_edit_changes_the_download_key(tmp_path):
    cache = tmp_path / "c"
    data = tmp_path / "mine.jsonl"
    data.write_text('{"instruction": "hi", "input": "", "output": "hello"}\n')
    args = ("model=tiny_llama", f"dataset.path={data}", "dataset.format=alpaca", "dataset.eval_size=0")

    def keys() -> tuple[str, str]:
        out = ftpipe("show", *args, cwd=tmp_path, cache=cache).stdout
        return out.split("download-model")[-1].split()[0], out.split("download-data")[-1].split()[0]

    model1, data1 = keys()
    data.write_text('{"instruction": "hi", "input": "", "output": "hey"}\n')
    model2, data2 = keys()
    assert data1 != data2 and model1 == model2


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


def test_a_non_ascii_value_typed_unquoted_works_as_in_xtuners_tutorial(tmp_path):
    """`dataset.name=伍鲜同志` dies in Hydra's lexer unless quoted; ftpipe quotes such values itself."""
    cache = tmp_path / "c"
    args = ("+recipe=assistant_lora", "model=tiny_llama", "dataset.name=伍鲜同志")
    show = ftpipe("show", *args, cwd=tmp_path, cache=cache)
    assert show.returncode == 0, show.stderr
    assert "name: 伍鲜同志" in show.stdout
    done = ftpipe(*args, "stages=[download-data]", cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = run_json(tmp_path)["stages"]
    rows = (Path(row["output"]) / "data" / "raw" / "assistant.jsonl").read_text(encoding="utf-8")
    assert "伍鲜同志" in rows


def test_cache_ls_counts_the_shared_folders(tmp_path):
    """Compiled artefacts and fetched files live in shared/, beside the entries: `cache ls` shows their size."""
    cache = tmp_path / "c"
    (cache / "shared" / "build" / "inductor").mkdir(parents=True)
    (cache / "shared" / "build" / "inductor" / "graph.bin").write_bytes(b"\0" * 3 * 2**20)
    out = ftpipe("cache", "ls", cwd=tmp_path, cache=cache).stdout
    assert "shared/build" in out and "3.0 MiB" in out and "total 3.0 MiB" in out, out
