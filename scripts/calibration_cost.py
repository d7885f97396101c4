"""What EGPO's calibration adds to a step: egpo_advantages (Eqs. 7-11, 13) and sequence_entropy (Eq. 5)
against grpo_advantages (Eq. 2), on a batch of 64 responses (8 groups of 8, 40 tokens each).

Each timing is the best of --repeats runs of --calls calls. With a run's metrics.jsonl, the extra cost
is also given as a share of that run's median step (time_sample + time_update):

    python egpo.py --out /tmp/default && python scripts/calibration_cost.py --metrics /tmp/default/metrics.jsonl
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # egpo.py, from any folder
import egpo  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="timings; the best counts (default 5)")
    parser.add_argument("--metrics", help="a run's metrics.jsonl: the cost as a share of its median step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rewards, entropy = (torch.rand(64) < 0.4).float(), torch.rand(64) * 2
    logprobs, mask = -torch.rand(64, 40), torch.ones(64, 40)

    def per_call(f):
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.calls):
                f()
            best = min(best, (time.perf_counter() - t) / args.calls)
        return best

    g = per_call(lambda: egpo.grpo_advantages(rewards, 8))
    e = per_call(lambda: egpo.egpo_advantages(rewards, entropy, 8))
    h = per_call(lambda: egpo.sequence_entropy(logprobs, mask))
    line = f"grpo_advantages {g * 1e6:.0f} us, egpo_advantages {e * 1e6:.0f} us, sequence_entropy {h * 1e6:.0f} us"
    if args.metrics:
        with open(args.metrics) as f:
            step = statistics.median(r["time_sample"] + r["time_update"] for r in map(json.loads, f))
        line += f"; extra {(e - g + h) / step:.2%} of the run's median step ({step * 1e3:.0f} ms)"
    print(line)


if __name__ == "__main__":
    main()
