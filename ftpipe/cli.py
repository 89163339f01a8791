"""The `ftpipe` command: a Hydra run by default, or one of the verbs below."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .errors import FtpipeError
from .paths import CONF_DIR, RECIPES_DIR, default_cache_root

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
    from . import engine
    from .cache import Cache
    from .config import compose, validate
    from .stages import CHAIN

    config_dir, overrides = _split_config_dir(args)
    resolved = validate(compose(overrides, config_dir))
    print(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    cache = Cache(resolved["cache_dir"])
    print(f"plan (cache: {cache.root}):")
    for step in engine.plan(resolved, CHAIN, cache):
        print(
            f"  {step.stage.name:<14} {step.key}  {'hit ' if step.hit else 'miss'}  {cache.entry_dir(step.stage.name, step.key)}"
        )


def _first_comment_lines(path: Path) -> list[str]:
    return [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]


def cmd_ls(args: list[str]) -> None:
    print("recipes (run with `ftpipe +recipe=NAME`, copy with `ftpipe cp recipe/NAME DEST`):")
    for recipe in sorted(RECIPES_DIR.glob("*.yaml")):
        about = next((c for c in _first_comment_lines(recipe)[2:]), "")
        print(f"  {recipe.stem:<22} {about}")
    print("\nconfig groups (swap with `GROUP=OPTION`):")
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "recipe"):
        print(
            f"  {group.name:<10} {', '.join(sorted(f.stem for f in group.glob('*.yaml') if not f.stem.startswith('_')))}"
        )


def cmd_cp(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ftpipe cp", description="Copy a recipe to edit it.")
    parser.add_argument("recipe", help="recipe/NAME or NAME")
    parser.add_argument("dest", help="a config folder; the copy lands in DEST/recipe/")
    parser.add_argument("--name", help="name of the copy (default: the recipe's name)")
    ns = parser.parse_args(args)
    name = ns.recipe.removeprefix("recipe/").removesuffix(".yaml")
    source = RECIPES_DIR / f"{name}.yaml"
    if not source.is_file():
        raise FtpipeError(f"no recipe {name!r}; `ftpipe ls` lists them")
    new_name = ns.name or name
    dest_dir = Path(ns.dest).expanduser().resolve()
    target = dest_dir / "recipe" / f"{new_name}.yaml"
    if target.exists():
        raise FtpipeError(f"{target} exists; not overwriting it (pick another --name or DEST)")
    target.parent.mkdir(parents=True, exist_ok=True)
    command = f"ftpipe --config-dir {dest_dir} +recipe={new_name}"
    lines = source.read_text().splitlines(keepends=True)
    # line 1 is Hydra's `# @package _global_`, line 2 the command that runs the recipe
    target.write_text(lines[0] + f"# {command}\n" + "".join(lines[2:]))
    print(f"copied to {target}\nedit it, then run:\n  {command}")


def cmd_cache(args: list[str]) -> None:
    from .cache import Cache

    parser = argparse.ArgumentParser(prog="ftpipe cache", description="Inspect or prune the stage cache.")
    parser.add_argument("action", choices=["ls", "gc"])
    parser.add_argument("--cache-dir", default=None, help="default: $FTPIPE_CACHE or ~/.cache/ftpipe")
    parser.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="gc: also drop entries unused this long",
    )
    parser.add_argument("--dry-run", action="store_true")
    ns = parser.parse_args(args)
    cache = Cache(ns.cache_dir or default_cache_root())
    if ns.action == "ls":
        total = 0
        print(f"cache: {cache.root}")
        for e in cache.entries():
            size = e.size_bytes
            total += size
            print(f"  {e.stage:<14} {e.key}  {e.state:<8} {size / 2**20:9.1f} MiB")
        print(f"total {total / 2**20:.1f} MiB")
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
        if i == len(ids) or (labels[i] != -100) != (labels[start] != -100):
            text = tokenizer.decode(ids[start:i])
            if labels[start] != -100:
                text = f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def cmd_check(args: list[str]) -> None:
    """Validate every dataset row (FILE:LINE for each problem) and show samples with the trained tokens marked."""
    from transformers import AutoTokenizer

    from . import engine
    from .cache import Cache
    from .config import compose, validate
    from .data.formats import convert_rows
    from .data.templates import encode_batch, encode_pretrain, resolve_template
    from .stages import CHAIN

    config_dir, overrides = _split_config_dir(args)
    resolved = validate(compose(overrides, config_dir))
    cache = Cache(resolved["cache_dir"])
    (download,) = engine.run(engine.plan({**resolved, "stages": ["download"]}, CHAIN, cache), cache)
    entry = Path(download["output"])
    dataset = resolved["dataset"]
    converted = convert_rows(entry / "data", dataset)
    report = converted.report()
    print(
        f"dataset {dataset['path']}: format {converted.format}{' (detected)' if converted.detected else ''}; "
        f"{report['rows']} rows: {report['rows_train']} train, {report['rows_eval']} held out, "
        f"{report['rows_dropped']} dropped by the format, {len(converted.problems)} problem(s)"
    )
    for problem in converted.problems:
        print(f"  {problem}")
    if converted.hint:
        print(f"hint: {converted.hint}")

    tokenizer = AutoTokenizer.from_pretrained(entry / "model")
    template = resolve_template(resolved["template"], tokenizer)
    max_length, too_long = dataset["max_length"], []
    for start in range(0, len(converted.train), 1000):
        batch = converted.train[start : start + 1000]
        if converted.format == "pretrain":
            ids, _ = encode_pretrain(tokenizer, [conv[0]["output"] for conv in batch])
        else:
            ids, _ = encode_batch(tokenizer, template, batch, dataset["train_on_inputs"])
        too_long += [(start + i, len(x)) for i, x in enumerate(ids) if len(x) > max_length]
    if too_long:
        verb = "split into chunks" if dataset["truncation"] == "split" else "truncated"
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
        if converted.format == "pretrain":
            (ids,), (labels,) = encode_pretrain(tokenizer, [conv[0]["output"]])
        else:
            (ids,), (labels,) = encode_batch(tokenizer, template, [conv], dataset["train_on_inputs"])
        print(f"--- {where} ({len(ids)} tokens, {sum(1 for x in labels if x != -100)} with loss)")
        print(_marked(tokenizer, ids, labels, color))
    if converted.problems:
        raise FtpipeError(
            f"{len(converted.problems)} bad row(s) (listed above); fix them or set dataset.skip_bad_rows=true"
        )
    print("\nok: every row is valid")


VERBS = {
    "show": cmd_show,
    "ls": cmd_ls,
    "cp": cmd_cp,
    "cache": cmd_cache,
    "check": cmd_check,
    "chat": cmd_chat,
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
        return
    if argv and argv[0] in ("-h", "--help", "help"):
        print(
            __doc__ + "\n  ftpipe +recipe=NAME [key=value ...]   run the pipeline (-m for a sweep)\n"
            "  ftpipe show|ls|cp|cache|check ...    see README.md"
        )
        return
    _hydra_run()


if __name__ == "__main__":
    main()
