"""`cwt-ray`: the command line, a thin shell over cwt_ray.pipeline.

User errors (bad config key or value, missing file, unusable data) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from .config import UserError, load_config

COMMANDS = {
    "run": ("the whole pipeline: data -> chunk -> train -> skip -> eval -> report (finished stages are skipped)",
            ("data", "chunk", "train", "skip", "eval", "report"), ()),
    "data": ("the data stage alone: read, validate and split the data into runs/<name>/data/, then print the data "
             "check (per split rows kept and rejected by kind, rationales stating no answer, rationale lengths in "
             "student tokens, steps per rationale against chunk.num_chunks, examples); always re-reads the files",
             ("data",), ("data",)),
    "chunk": ("prepare the data splits and chunk every training rationale (Ray Data)",
              ("data", "chunk"), ("chunk",)),
    "train": ("train every method's student (Ray Train); needs `chunk` done. STT's skip data are made from the "
              "CWT student on the way (the skip stage, redone with a forced retraining)",
              ("train",), ("train",)),
    "skip": ("the skip stage alone: score which middle chunks the trained CWT student can do without, into "
             "runs/<name>/skips/train/ (STT's training data); needs `train` of cwt done",
             ("skip",), ("skip",)),
    "eval": ("evaluate every trained student on the eval split (Ray Data generation)",
             ("eval",), ("eval",)),
    "report": ("write report.md, metrics.json and loss_curves.png from what the run directory holds",
               ("report",), ("report",)),
}

# Every subcommand that reads an experiment YAML points to the generated key reference.
CONFIG_KEYS_EPILOG = "Every config key, its type, default and help: docs/config.md"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cwt-ray",
        description="Chunk-wise (CWT) and skip-thinking chain-of-thought distillation on Ray. Each command reads "
                    "an experiment YAML, applies key.sub=value overrides, and reads/writes <storage_path>/<name>/.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=CONFIG_KEYS_EPILOG)
        p.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 methods=[cwt]")
        if name == "run":
            p.add_argument("--overwrite", action="store_true", help="delete the run directory and start over")
    g = sub.add_parser("generate", help="answer one question with a saved student (skip-aware for STT students)",
                       description="Answer one question with a saved student folder (e.g. runs/quickstart/students/stt); "
                                   "prints the reasoning stage by stage, what was skipped, and the answer.")
    g.add_argument("student", help="student folder with a cwt_student.json (runs/<name>/students/<method>)")
    g.add_argument("question")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--skip-confidence", type=float, default=None,
                   help="STT: skip a stage only when P(skip) >= this (default: the student's greedy choice)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    help_text = ("generate rationales for the train split's questions with a local teacher model (teach.*), "
                 "N per question, on a Ray Data actor pool; writes runs/<name>/teach/rationales.parquet")
    p = sub.add_parser("teach", help=help_text, description=help_text, epilog=CONFIG_KEYS_EPILOG)
    p.add_argument("config", help="experiment YAML with data.* (the questions) and teach.teacher")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teach.num_samples=4 teach.temperature=0.7")
    help_text = ("hyperparameter search (Optuna through Ray Tune): each trial runs the pipeline on the validation "
                 "split; writes runs/<sweep>/report.md, report.html and best_config.yaml (docs/sweeps.md)")
    p = sub.add_parser("sweep", help=help_text, description=help_text)
    p.add_argument("config", help="sweep YAML, e.g. configs/sweep_quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the sweep file, e.g. num_samples=4 "
                                                "overrides.train.epochs=1")
    p.add_argument("--overwrite", action="store_true", help="delete the sweep directory and start over")
    return parser


def _sweep(args) -> int:
    from .sweep import run_sweep
    from .sweep_config import load_sweep

    sweep = load_sweep(args.config, args.overrides)
    report = run_sweep(sweep, overwrite=args.overwrite)
    if report is None:
        return 130
    print(f"cwt-ray sweep: done. Report: {report}")
    return 0


def _generate(args) -> int:
    import json
    from pathlib import Path

    from .cluster import set_offline_env

    set_offline_env()
    if not (Path(args.student) / "cwt_student.json").is_file():
        raise UserError(f"{args.student}: not a student folder (no cwt_student.json); try runs/<name>/students/<method>")
    if args.skip_confidence is not None and not 0 <= args.skip_confidence <= 1:
        raise UserError(f"--skip-confidence must be in [0, 1] (got {args.skip_confidence})")
    from .decode import answer_question, format_answer

    result = answer_question(args.student, args.question, args.max_new_tokens, args.skip_confidence)
    print(json.dumps(result, indent=2) if args.json else format_answer(result))
    return 0


def _teach(args) -> int:
    from .cluster import ray_session
    from .pipeline import preflight
    from .teach import teach

    cfg = load_config(args.config, args.overrides)
    preflight(cfg, ("data",))
    with ray_session(cfg):
        out = teach(cfg)
    print(f"cwt-ray teach: done. Output: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "teach":
            return _teach(args)
        cfg = load_config(args.config, args.overrides)
        from .pipeline import run_stages

        _, stages, force = COMMANDS[args.command]
        out = run_stages(cfg, stages=stages, force=force, overwrite=getattr(args, "overwrite", False))
        print(f"cwt-ray {args.command}: done. Output: {out}")
        return 0
    except UserError as e:
        print(f"cwt-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cwt-ray: interrupted; finished stages are kept, re-run the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
