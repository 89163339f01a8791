"""The `ftpipe` command: a Hydra run by default, or one of the verbs below."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .data.labels import IGNORE_INDEX
from .errors import FtpipeError, os_error_line
from .paths import CONF_DIR, default_cache_root

log = logging.getLogger("ftpipe")


def _hydra_run() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from . import app

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def task(cfg) -> float | None:
        try:
            return app.run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except FtpipeError as exc:
            log.error("%s", exc)
            sys.exit(1)
        except OSError as exc:
            if (line := os_error_line(exc)) is None:
                raise
            log.error("%s", line)
            sys.exit(1)
        except KeyboardInterrupt:
            log.error(
                "interrupted: finished stages stay cached and train keeps its last checkpoint; "
                "rerun the same command to resume"
            )
            sys.exit(130)

    task()


def _split_config_dir(args: list[str]) -> tuple[str | None, list[str]]:
    """Pull Hydra's `--config-dir DIR` / `-cd DIR` out of a verb's arguments."""
    config_dir, rest, it = None, [], iter(args)
    for arg in it:
        if arg in ("--config-dir", "-cd"):
            config_dir = next(it, None)
        elif arg.startswith("--config-dir="):
            config_dir = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config_dir, rest


def cmd_show(args: list[str]) -> None:
    from . import stages
    from .cache import Cache
    from .config import compose, validate

    config_dir, overrides = _split_config_dir(args)
    resolved = validate(compose(overrides, config_dir))
    print(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    cache = Cache(resolved["cache_dir"])
    print(f"plan (cache: {cache.root}):")
    plan = stages.plan(resolved, cache)
    for step in plan:
        print(
            f"  {step.stage.name:<14} {step.key}  {'hit ' if step.hit else 'miss'}  {cache.entry_dir(step.stage.name, step.key)}"
        )
    train = next((step for step in plan if step.stage.name == "train"), None)
    if train is not None:
        from .training.launch import SPEC, describe

        print()
        for line in describe(train.slice, cache.tmp_dir("train", train.key) / SPEC):
            print(line)


def cmd_ls(args: list[str]) -> None:
    from .recipes import RECIPES

    print("recipes (run with `ftpipe +recipe=NAME`, copy with `ftpipe cp recipe/NAME DEST`):")
    for entry in RECIPES:
        print(f"  {entry.name:<22} {entry.summary}")
    print("\nconfig groups (swap with `GROUP=OPTION`):")
    groups: dict[str, list[str]] = {}
    for option in sorted(CONF_DIR.glob("*/**/*.yaml")):
        group = option.parent.relative_to(CONF_DIR).as_posix()
        if group != "recipe" and not option.stem.startswith("_"):
            groups.setdefault(group, []).append(option.stem)
    for group, options in groups.items():
        print(f"  {group:<15} {', '.join(options)}")


def cmd_cp(args: list[str]) -> None:
    from .recipes import recipe

    parser = argparse.ArgumentParser(prog="ftpipe cp", description="Copy a recipe to edit it.")
    parser.add_argument("recipe", help="recipe/NAME or NAME")
    parser.add_argument("dest", help="a config folder; the copy lands in DEST/recipe/")
    parser.add_argument("--name", help="name of the copy (default: the recipe's name)")
    ns = parser.parse_args(args)
    source = recipe(ns.recipe)
    new_name = ns.name or source.name
    dest_dir = Path(ns.dest).expanduser().resolve()
    target = dest_dir / "recipe" / f"{new_name}.yaml"
    if target.exists():
        raise FtpipeError(f"{target} exists; not overwriting it (pick another --name or DEST)")
    target.parent.mkdir(parents=True, exist_ok=True)
    command = f"ftpipe --config-dir {dest_dir} +recipe={new_name}"
    lines = source.path.read_text().splitlines(keepends=True)
    # line 1 is Hydra's `# @package _global_`, line 2 the command that runs the recipe
    target.write_text(lines[0] + f"# {command}\n" + "".join(lines[2:]))
    print(f"copied to {target}\nedit it, then run:\n  {command}")


def cmd_cache(args: list[str]) -> None:
    from .cache import Cache

    parser = argparse.ArgumentParser(prog="ftpipe cache", description="Inspect or prune the stage cache.")
    parser.add_argument("action", choices=["ls", "gc", "verify"])
    parser.add_argument("--cache-dir", default=None, help="default: $FTPIPE_CACHE or ~/.cache/ftpipe")
    parser.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="gc: also drop entries unused this long",
    )
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--remove", action="store_true", help="verify: delete the damaged entries")
    ns = parser.parse_args(args)
    cache = Cache(ns.cache_dir or default_cache_root())
    if ns.action == "ls":
        total = 0
        print(f"cache: {cache.root}")
        for e in cache.entries():
            size = e.size_bytes
            total += size
            print(f"  {e.stage:<14} {e.key}  {e.state:<8} {size / 2**20:9.1f} MiB")
        shared = cache.shared_folders()
        if shared:
            print("shared (outlives entries; safe to delete, refetched or rebuilt when needed):")
        for folder, size in shared:
            total += size
            print(f"  {folder.relative_to(cache.root).as_posix():<35} {size / 2**20:9.1f} MiB")
        print(f"total {total / 2**20:.1f} MiB")
    elif ns.action == "verify":
        damaged = 0
        for e in cache.entries():
            problems = cache.damaged(e.path) if e.state == "complete" else []
            if problems:
                damaged += 1
                print(f"  damaged {e.stage}/{e.key}: {'; '.join(problems)}")
                if ns.remove:
                    shutil.rmtree(e.path)
        print(
            f"{damaged} damaged entr{'y' if damaged == 1 else 'ies'}"
            + (" removed" if ns.remove and damaged else "")
        )
        if damaged and not ns.remove:
            raise FtpipeError(
                "damaged entries are recomputed when a run needs them; `--remove` deletes them now"
            )
    else:
        removed = cache.gc(ns.older_than, ns.dry_run)
        verb = "would remove" if ns.dry_run else "removed"
        for e in removed:
            print(f"  {verb} {e.stage}/{e.path.name}")
        print(f"{verb} {len(removed)} item(s)")
        for link in cache.strays():
            print(f"  left alone: {link.relative_to(cache.root)} is a symlink (gc never follows links)")


def cmd_chat(args: list[str]) -> None:
    from .chat import main as chat_main

    chat_main(args)


def _marked(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """The sample's text with the tokens that carry loss marked: green on a terminal, else [[…]]."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i])
            if labels[start] != IGNORE_INDEX:
                text = f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def cmd_check(args: list[str]) -> None:
    """Validate every dataset row (FILE:LINE for each problem) and show samples with the trained tokens marked."""
    from transformers import AutoTokenizer

    from . import engine, stages
    from .cache import Cache
    from .config import compose, validate
    from .data.formats import PREFERENCE_FORMAT, convert_rows, pair_conversations
    from .data.templates import encode, resolve_template

    config_dir, overrides = _split_config_dir(args)
    resolved = validate(compose(overrides, config_dir))
    cache = Cache(resolved["cache_dir"])
    rows = {r["name"]: r for r in engine.run(stages.plan({**resolved, "stages": ["download"]}, cache), cache)}
    model_dir = Path(rows["download-model"]["output"]) / "model"
    dataset = resolved["dataset"]
    converted = convert_rows(Path(rows["download-data"]["output"]) / "data", dataset)
    report = converted.report()
    print(
        f"dataset {dataset['path']}: format {converted.format}{' (detected)' if converted.detected else ''}; "
        f"{report['rows']} rows: {report['rows_train']} train, {report['rows_eval']} held out, "
        f"{report['rows_dropped']} dropped by the format, {len(converted.problems)} problem(s)"
    )
    for problem in converted.problems:
        print(f"  {problem}")
    for warning in converted.warnings:
        print(f"  warning: {warning}")
    if converted.hint:
        print(f"hint: {converted.hint}")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = resolve_template(resolved["template"], tokenizer)
    pairs = converted.format == PREFERENCE_FORMAT
    # a pair is encoded as map does: two documents, chosen then rejected, which pack must fit in one row
    docs = (
        [side for conv in converted.train for side in pair_conversations(conv)] if pairs else converted.train
    )
    per_row = 2 if pairs else 1
    max_length, too_long = dataset["max_length"], []
    for start in range(0, len(docs), 1000):
        batch = docs[start : start + 1000]
        _, _, offsets = encode(tokenizer, template, batch, converted.format, dataset["train_on_inputs"])
        lengths = (offsets[1:] - offsets[:-1]).tolist()
        if pairs:
            lengths = [a + b for a, b in zip(lengths[0::2], lengths[1::2], strict=True)]
        first = start // per_row
        too_long += [(first + i, n) for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        verb = {"split": "split into chunks", "drop": "left out"}.get(dataset["truncation"], "truncated")
        print(
            f"note: {len(too_long)} row(s) are longer than dataset.max_length={max_length} and will be {verb}:"
        )
        for i, n in too_long[:5]:
            print(f"  {converted.where[i]}: {n} tokens")

    color = sys.stdout.isatty()
    legend = "green" if color else "inside [[ ]]"
    print(
        f"\n{min(3, len(converted.train))} sample(s), template {template.get('name')}; tokens with loss {legend}:"
    )
    for conv, where in list(zip(converted.train, converted.where, strict=True))[:3]:
        sides = (
            zip(("chosen: ", "rejected: "), pair_conversations(conv), strict=True) if pairs else [("", conv)]
        )
        for side, doc in sides:
            flat_ids, flat_labels, _ = encode(
                tokenizer, template, [doc], converted.format, dataset["train_on_inputs"]
            )
            ids, labels = flat_ids.tolist(), flat_labels.tolist()
            trained = sum(1 for x in labels if x != IGNORE_INDEX)
            print(f"--- {side}{where} ({len(ids)} tokens, {trained} with loss)")
            print(_marked(tokenizer, ids, labels, color))
    if converted.problems:
        raise FtpipeError(
            f"{len(converted.problems)} bad row(s) (listed above); fix them or set dataset.skip_bad_rows=true"
        )
    print("\nok: every row is valid")


def cmd_probe(args: list[str]) -> None:
    """The longest single sequence the config's training fits on this machine, with tokens/s there."""
    import json

    from . import engine, stages
    from .cache import Cache
    from .config import compose, validate
    from .training.probe import longest, probe

    parser = argparse.ArgumentParser(prog="ftpipe probe", description=cmd_probe.__doc__)
    parser.add_argument("--start", type=int, default=8192, help="first length tried (tokens)")
    parser.add_argument("--max-tokens", type=int, default=262144, help="longest length tried")
    parser.add_argument("--resolution", type=int, default=4096, help="bisect to this many tokens")
    parser.add_argument("--json", help="also write the attempts here")
    known, rest = parser.parse_known_args(args)
    config_dir, overrides = _split_config_dir(rest)
    resolved = validate(compose(overrides, config_dir))
    cache = Cache(resolved["cache_dir"])
    rows = engine.run(stages.plan({**resolved, "stages": ["download-model"]}, cache), cache)
    model_dir = Path(next(r for r in rows if r["name"] == "download-model")["output"]) / "model"
    attempts = probe(model_dir, resolved, known.start, known.max_tokens, known.resolution)
    best = longest(attempts)
    if known.json:
        Path(known.json).write_text(json.dumps([a.to_dict() for a in attempts], indent=1))
    if best is None:
        raise FtpipeError(f"probe: not even {attempts[0].tokens} tokens fit; try a smaller --start")
    peak = f", peak {best.peak_gib:.2f} GiB" if best.peak_gib is not None else ""
    first_fail = min((a.tokens for a in attempts if not a.fits), default=None)
    bound = (
        f"; {first_fail} did not fit"
        if first_fail
        else " (the limit tried; raise --max-tokens to go further)"
    )
    print(
        f"longest sequence that trains: {best.tokens} tokens{peak}, {best.tokens_per_second:.0f} tokens/s"
        f"{bound}"
    )


VERBS = {
    "show": cmd_show,
    "ls": cmd_ls,
    "cp": cmd_cp,
    "cache": cmd_cache,
    "check": cmd_check,
    "chat": cmd_chat,
    "probe": cmd_probe,
}


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in VERBS:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        try:
            VERBS[argv[0]](argv[1:])
        except FtpipeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except OSError as exc:
            if (line := os_error_line(exc)) is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            sys.exit(1)
        return
    if argv and argv[0] in ("-h", "--help", "help"):
        print(
            __doc__ + "\n  ftpipe +recipe=NAME [key=value ...]   run the pipeline (-m for a sweep)\n"
            "  ftpipe show|ls|cp|cache|check|chat|probe ...    see README.md"
        )
        return
    from .config import compose, quote_overrides

    sys.argv[1:] = quote_overrides(argv)
    if not any(arg.startswith("-") for arg in argv):  # a plain run: Hydra's own report of a bad override
        try:  # spans several lines, so compose once first to say it in one
            compose(argv)
        except FtpipeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
    _hydra_run()


if __name__ == "__main__":
    main()
