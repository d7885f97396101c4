"""Toy versions of the paper's Table 1 (baselines) and Table 2 (ablations), on the tiny model.

Each seed warms the tiny model up once (`egpo.py --steps 0`); every method then trains from that
checkpoint with the same seed and budget, so the runs of one seed differ in the method only. The
table gives each method's mean over the seeds after RL and its paired difference to the baseline
(same warm-up, same seed) with a 95% interval (Student's t over the paired differences).

    python scripts/table_study.py                                     # 11 methods x 5 seeds: about 45 min on 2 cores
    python scripts/table_study.py --seeds 20 --methods "GRPO,EGPO,no NSR"
    python scripts/table_study.py --seeds 20 --methods "no NSR,EGPO" --baseline "no NSR"   # NSR's effect

Runs go to --out (runs/table); a run that is complete (its summary.json, and a warm-up's checkpoint) is
reused, not run again, so a second command that shares seeds and methods with the first costs only the
new runs.
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # egpo.py, from any folder
METHODS = {"GRPO": "--algo grpo", "DAPO": "--algo dapo", "EDGE-GRPO": "--algo edge-grpo", "EGPO": "",
           "C1 symmetric": "--calibration symmetric", "C2 neg-only": "--calibration neg-only",
           "C3 pos-only": "--calibration pos-only", "C4 NSR w=1": "--nsr flat", "C5 clamp-renorm": "--renorm after-clamp",
           "C6 renorm-clamp": "--renorm before-clamp", "no NSR": "--nsr off"}
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045]  # df 1-29


def run(argv: list[str]) -> str:
    """egpo.main(argv) in this worker process, its console output to OUT/log.txt; '' or the error."""
    import egpo

    out = argv[argv.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "log.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            egpo.main(argv)
        except SystemExit as e:
            return f"egpo.py {' '.join(argv)} exited with {e.code}: see {out}/log.txt" if e.code else ""
    return ""


def run_all(pool, commands: list[list[str]], checkpoint: bool = False):
    """Each command whose run is not complete yet (`checkpoint`: with it), on the pool's worker processes
    (or in this one); a run stopped before its end is done again from the start."""
    todo = [c + ["--overwrite"] for c in commands
            if not done(c[c.index("--out") + 1], int(c[c.index("--steps") + 1]), checkpoint)]
    print(f"{len(commands) - len(todo)} runs reused, {len(todo)} to run", flush=True)
    for command, error in zip(todo, (pool.map if pool else map)(run, todo)):
        if error:
            sys.exit(error)
        print(f"  done: egpo.py {' '.join(command)}", flush=True)


def done(out: str, steps: int, checkpoint: bool = False) -> bool:
    """The run in `out` did its `steps` to the end, and (`checkpoint`) left its checkpoint."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        return summary["steps_done"] == steps and not summary.keys() & {"interrupted", "checkpoint_error"} and \
            (not checkpoint or os.path.isfile(os.path.join(out, "checkpoint", "trainer_state.json")))
    except (OSError, ValueError, KeyError):
        return False


def paired(values: list[float], baseline: list[float], scale: float, fmt: str) -> str:
    """Mean paired difference to the baseline [95% interval]."""
    d = [scale * (x - y) for x, y in zip(values, baseline)]
    if len(d) < 2 or any(map(math.isnan, d)):
        return f"{statistics.mean(d):+{fmt}}"
    m, half = statistics.mean(d), T975[min(len(d), 30) - 2] * statistics.stdev(d) / len(d) ** 0.5
    return f"{m:+{fmt}} [{m - half:+{fmt}}, {m + half:+{fmt}}]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--baseline", default="GRPO", help="the method the differences are taken to (default GRPO)")
    parser.add_argument("--digits", type=int, default=3, help="--toy-digits of the task (default 3)")
    parser.add_argument("--steps", type=int, default=100, help="RL steps of each run (default 100)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2; 1: in this "
                                                            "process)")
    parser.add_argument("--out", default="runs/table", help="folder of the runs (default runs/table)")
    parser.add_argument("--egpo-args", default="", help="more egpo.py flags for every run (e.g. a smaller run)")
    parser.add_argument("--warmup-args", default="", help="more egpo.py flags for the warm-ups only")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods + [args.baseline] if m not in METHODS]
    if unknown or args.baseline not in methods:
        parser.error(f"unknown method {unknown[0]!r}" if unknown else f"--baseline {args.baseline} is not in --methods")
    seeds, task, extra = range(args.seeds), ["--toy-digits", str(args.digits)], args.egpo_args.split()

    def folder(name, seed):
        return os.path.join(args.out, f"{name.replace(' ', '-')}-s{seed}")

    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) if args.jobs > 1 else \
            contextlib.nullcontext() as pool:  # each worker process imports egpo once
        run_all(pool, [task + ["--seed", str(s), "--steps", "0", *extra, *args.warmup_args.split(), "--out",
                               folder("warm", s)] for s in seeds], checkpoint=True)  # the RL runs start from it
        run_all(pool, [task + ["--model", os.path.join(folder("warm", s), "checkpoint"), "--seed", str(s), "--steps",
                               str(args.steps), *METHODS[m].split(), *extra, "--out", folder(m, s)]
                       for m in methods for s in seeds])

    def summary(name, seed):
        with open(os.path.join(folder(name, seed), "summary.json")) as f:
            return json.load(f)

    def after(name, key, when="after"):  # an undefined number (null: no right or no wrong answer) is NaN
        return [math.nan if v is None else v for v in (summary(name, s)[when][key] for s in seeds)]

    def gap(name):  # Section 4.4: mean H of wrong minus right answers, on the held-out samples
        return [x - y for x, y in zip(after(name, "eval_entropy_incorrect"), after(name, "eval_entropy_correct"))]

    def metrics(name, seed):
        with open(os.path.join(folder(name, seed), "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    base = args.baseline
    with open(os.path.join(folder(base, 0), "config.json")) as f:
        config = json.load(f)
    print(f"\n{len(seeds)} seeds, {args.digits}-digit task, {args.steps} RL steps of {config['prompts_per_step']} x "
          f"{config['group_size']}, {(time.perf_counter() - start) / 60:.0f} min\n")
    print(f"| method | greedy % | vs {base} | sampled % | vs {base} | AUROC | vs {base} | H wrong - H right |")
    print("|---|---|---|---|---|---|---|---|")
    for m in methods:
        row = [m]
        for key, scale, fmt in [("eval_acc", 100, ".1f"), ("eval_acc_sampled", 100, ".1f"), ("eval_auroc", 1, ".3f")]:
            row += [f"{scale * statistics.mean(after(m, key)):{fmt}}",
                    "" if m == base else paired(after(m, key), after(base, key), scale, fmt)]
        print("| " + " | ".join(row + [f"{statistics.mean(gap(m)):.3f}"]) + " |")
    print(f"\nwarm-up steps {[summary('warm', s)['sft_steps_done'] for s in seeds]}; at the start: greedy "
          f"{[round(100 * x, 1) for x in after('warm', 'eval_acc', 'before')]} %, sampled "
          f"{100 * statistics.mean(after('warm', 'eval_acc_sampled', 'before')):.1f} %, AUROC "
          f"{statistics.mean(after('warm', 'eval_auroc', 'before')):.3f}")
    wrong = {m: statistics.mean(r["groups_all_wrong"] / (r["groups_all_wrong"] + r["groups_mixed"]
                                                         + r["groups_all_correct"])
                                for s in seeds for r in metrics(m, s)) for m in methods}
    print("all-wrong groups: " + ", ".join(f"{m} {100 * w:.1f}%" for m, w in wrong.items()))
    if "DAPO" in methods:
        print(f"DAPO drew {statistics.mean(r['groups_sampled'] for s in seeds for r in metrics('DAPO', s)):.1f} "
              "groups a step")


if __name__ == "__main__":
    main()
