"""Mutation check: how many plausible one-line bugs in egpo.py does the test suite catch?

Each mutation replaces one snippet of egpo.py (it must occur there exactly once) in a copy of the
repository and runs `pytest -x -q` in that copy: the mutant is killed if the suite fails. A mutation
belongs to Part I or Part II by where its snippet sits. Not part of CI: every mutation takes about 30
minutes on 2 cores (a survivor runs the whole suite).

    python scripts/mutation_check.py                  # every mutation, two at a time
    python scripts/mutation_check.py --only eq8,eq9   # those whose name starts so
    python scripts/mutation_check.py --list           # the mutations, not run
"""
import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTATIONS = [  # (name, the snippet of egpo.py, what it becomes): a bug a contributor could write
    # Eq. 5, the entropy proxy
    ("eq5-unmasked", "-(logprobs.detach() * mask).sum(-1)", "-logprobs.detach().sum(-1)"),
    ("eq5-sign", "-(logprobs.detach() * mask).sum(-1)", "(logprobs.detach() * mask).sum(-1)"),
    ("eq5-empty-is-zero", 'n.clamp(min=1), float("nan"))', "n.clamp(min=1), 0.0)"),
    ("eq5-not-detached", "-(logprobs.detach() * mask)", "-(logprobs * mask)"),
    ("eq5-answer-span-from-marker", ">= last + k", ">= last"),
    # Eq. 2, GRPO's advantage
    ("eq2-biased-std", "(r.std(1, keepdim=True) + eps)", "(r.std(1, keepdim=True, unbiased=False) + eps)"),
    ("eq2-no-centering", "((r - r.mean(1, keepdim=True)) /", "((r - 0.5) /"),
    # Eqs. 7-11, 13, EGPO's advantage
    ("eq7-inverted", "h.nanmean(1, keepdim=True) / (h + eps_h)", "(h + eps_h) / h.nanmean(1, keepdim=True)"),
    ("eq7-nan-in-mean", "w = h.nanmean(1, keepdim=True)", "w = h.mean(1, keepdim=True)"),
    ("eq7-nan-weight-0", "torch.where(h.isnan(), 1.0, w)", "torch.where(h.isnan(), 0.0, w)"),
    ("eq8-no-upper-clamp", "w_hat.clamp(lambda_min, lambda_max)", "w_hat.clamp(min=lambda_min)"),
    ("eq8-no-lower-clamp", "w_hat.clamp(lambda_min, lambda_max)", "w_hat.clamp(max=lambda_max)"),
    ("eq8-correct-weakened", 'c.clamp(min=1.0) if calibration in ("asymmetric", "pos-only")',
     'c.clamp(max=1.0) if calibration in ("asymmetric", "pos-only")'),
    ("eq8-wrong-strengthened", 'c.clamp(max=1.0) if calibration in ("asymmetric", "neg-only")',
     'c.clamp(min=1.0) if calibration in ("asymmetric", "neg-only")'),
    ("eq8-sides-swapped", "torch.where(r > 0, w_correct, w_wrong)", "torch.where(r > 0, w_wrong, w_correct)"),
    ("eq8-c2-c3-swapped", 'if calibration in ("asymmetric", "pos-only")', 'if calibration in ("asymmetric", "neg-only")'),
    ("eq9-batch-mean-after", "w = w / w.mean(1, keepdim=True)", "w = w / w.mean()"),
    ("eq9-batch-mean-before", "w_hat = w_hat / w_hat.mean(1, keepdim=True)", "w_hat = w_hat / w_hat.mean()"),
    ("eq10-any-wrong-is-all-wrong", "r.amax(1, keepdim=True) <= 0", "r.amin(1, keepdim=True) <= 0"),
    ("eq13-flat-ignored", "w = torch.where(all_wrong, 1.0, w)", "w = torch.where(all_wrong, w, w)"),
    ("eq13-half-push", 'nsr_base = -1.0 if nsr in ("entropy", "flat")', 'nsr_base = -0.5 if nsr in ("entropy", "flat")'),
    ("eq13-off-ignored", 'if nsr in ("entropy", "flat") else 0.0', 'if nsr in ("entropy", "flat", "off") else 0.0'),
    # Eq. 12, the policy loss
    ("eq12-max", "per_token = -torch.min(unclipped, clipped)", "per_token = -torch.max(unclipped, clipped)"),
    ("eq12-high-bound-is-low", "ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)",
     "ratio.clamp(1 - clip_eps_low, 1 + clip_eps_low)"),
    ("eq12-low-bound-is-high", "ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)",
     "ratio.clamp(1 - clip_eps_high, 1 + clip_eps_high)"),
    ("eq12-kl-sign", "delta = ref_logprobs - logprobs", "delta = logprobs - ref_logprobs"),
    ("eq12-kl-not-added", "per_token = per_token + beta * kl", "per_token = per_token"),
    ("eq12-token-mean-per-response", "return (x * mask).sum() / mask.sum().clamp(min=1)",
     "return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()"),
    ("eq12-seq-mean-over-width", "((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()",
     "((x * mask).sum(-1) / mask.shape[-1]).mean()"),
    ("eq12-clip-frac-both-sides", "clip_active = (clipped < unclipped)", "clip_active = (clipped != unclipped)"),
    # one RL step
    ("step-old-logprobs-only-for-mu-3", "if cfg.mu > 1 else None", "if cfg.mu > 2 else None"),
    ("step-epochs-accumulate", "    for _ in range(cfg.mu):\n        optimizer.zero_grad()\n",
     "    optimizer.zero_grad()\n    for _ in range(cfg.mu):\n"),
    ("step-lambda-max-dropped", "lambda_max=cfg.lambda_max", "lambda_max=2.0"),
    ("step-renorm-dropped", "nsr=cfg.nsr, renorm=cfg.renorm", "nsr=cfg.nsr, renorm=\"none\""),
    ("step-edge-egpo-bounds", ".clamp(0.5, 2.0) * adv", ".clamp(0.8, 2.0) * adv"),
    ("step-dapo-overfills", "mixed &= mixed.cumsum(0) <= n_prompts - n_mixed", "mixed &= mixed.cumsum(0) <= n_prompts"),
    ("step-no-grad-clip", "norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),\n" + " " * 46 + "cfg.max_grad_norm",
     "norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),\n" + " " * 46 + "0 * cfg.max_grad_norm"),
    ("step-one-process-denominator", "[x * rank_and_world_size()[1] / total_rows for x in rows]",
     "[x / total_rows for x in rows]"),
    ("step-dapo-keeps-uniform", 'mixed = batch["rewards"].view(-1, G).std(1) > 0', 'mixed = batch["rewards"].view(-1, G).std(1) >= 0'),
    # the sampler
    ("sample-no-temperature", "(hidden.float() / temperature) @ head.float().T", "hidden.float() @ head.float().T"),
    ("sample-row-restarts", "done |= torch.isin(token, stop)", "done = torch.isin(token, stop)"),
    ("sample-top-p-inclusive", "probs = torch.where(before < top_p * probs.sum(-1, keepdim=True), probs, 0.0)",
     "probs = torch.where(before <= top_p * probs.sum(-1, keepdim=True), probs, 0.0)"),
    ("sample-eos-not-trained", "return (is_eos.cumsum(1) - is_eos) == 0", "return is_eos.cumsum(1) == 0"),
    ("sample-golds-misaligned", "golds = [g for g in golds for _ in range(n)]", "golds = golds * n"),
    ("sample-position-ids", "position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # as generate()",
     "position_ids = (attention_mask.cumsum(1)).clamp(min=0)  # as generate()"),
    # Part II: the verifier, data, warm-up, metrics, torchrun, checkpoints, flags
    ("verify-first-box", "for match in reversed(boxes):", "for match in boxes:"),
    ("verify-first-hashes", 'text.rsplit("####", 1)[1]', 'text.split("####", 1)[1]'),
    ("verify-first-answer-line", '(re.findall(r"ANSWER:\\s*(.*)", completion) or [None])[-1]',
     '(re.findall(r"ANSWER:\\s*(.*)", completion) or [None])[0]'),
    ("verify-absolute-tolerance", "abs(x - y) <= Fraction(1, 10 ** 6) * max(abs(x), abs(y))",
     "abs(x - y) <= Fraction(1, 10 ** 6)"),
    ("verify-tolerance-for-integers", "and not (_finite(x) and _finite(y))", ""),
    ("verify-any-variable", "return float((x == y or not (x and y)) and _same(a, b))", "return float(_same(a, b))"),
    ("verify-four-digit-thousands", r"[1-9]\d{0,2}(?:,\d{3})+", r"[1-9]\d{0,3}(?:,\d{3})+"),
    ("data-last-duplicate", 'rows.setdefault(row["question"], row)', 'rows[row["question"]] = row'),
    ("warmup-trains-on-prompts", "labels.append([-100] * len(prompts[i]) + target)",
     "labels.append(prompts[i] + target)"),
    ("warmup-target-strict", 'if batch["rewards"].mean() >= cfg.sft_target', 'if batch["rewards"].mean() > cfg.sft_target'),
    ("metrics-auroc-ties-low", "rank = (counts.cumsum(0) - (counts - 1) / 2)[inverse]",
     "rank = (counts.cumsum(0) - (counts - 1))[inverse]"),
    ("metrics-fragile-without-h", "(~confident & correct & valid)", "(~confident & correct)"),
    ("metrics-pass1-layout", "sampled.view(-1, k).mean(1)", "sampled.view(k, -1).mean(0)"),
    ("metrics-se-over-n", "pass1.std() / len(pass1) ** 0.5", "pass1.std() / len(pass1)"),
    ("dist-draw-same-prompts", "lo, hi = rank * per_process, (rank + 1) * per_process", "lo, hi = 0, per_process"),
    ("dist-stop-not-shared", "all_reduce(len(self.signals), self.device) > 0", "len(self.signals) > 0"),
    ("checkpoint-deleted-not-moved", "os.replace(final, old)", "shutil.rmtree(final)"),
    ("resume-drops-the-checkpoints-step", '_step_of(line) <= resumed["step"]', '_step_of(line) < resumed["step"]'),
    ("resume-prompts-not-restored", 'rng.setstate(generators["python"])', "None"),
    ("signal-twice-not-at-once", "twice = signum == signal.SIGINT and signal.SIGINT in self.signals", "twice = False"),
    ("flags-open-bound-closed", "return x >= bound if check.startswith(\">=\") else x > bound", "return x >= bound"),
    ("flags-open-interval-closed", '(low <= x if check[0] == "[" else low < x)', "(low <= x)"),
    ("flags-resume-may-change-lr", 'RESUMABLE = ("steps", "save_every")', 'RESUMABLE = ("steps", "save_every", "lr")'),
    ("context-check-without-answer", "max(map(len, ps)) + new > limit", "max(map(len, ps)) > limit"),
    ("verify-first-answer-tag", 'text.rfind("<answer>", 0, max(end, 0))', 'text.find("<answer>")'),
    ("verify-units-kept", "    for _ in range(3):\n        m = _LAST_WORD", "    for _ in range(0):\n        m = _LAST_WORD"),
    ("verify-words-case-sensitive", "return _squeeze(a).lower() == _squeeze(b).lower()",
     "return _squeeze(a) == _squeeze(b)"),
    ("verify-spaces-between-digits-dropped", 'return re.sub(r"(?<!\\d)\\s+|\\s+(?!\\d)", "", s)',
     'return re.sub(r"\\s+", "", s)'),
    ("verify-root-of-a-negative", "if c < 0 or bits > 400", "if bits > 400"),
    ("data-gsm8k-gold-is-the-solution", 'extract_answer(answer) or ""', "answer"),
    ("data-mmlu-letter-shifted", 'string.ascii_uppercase[int(r["answer"])]', 'string.ascii_uppercase[int(r["answer"]) + 1]'),
    ("data-openr1-keeps-proofs", 'if r.get("question_type") == "proof" or', "if False or"),
    ("data-sft-without-solutions", 'if cfg.sft_steps and not all("solution" in r for r in rows)', "if False"),
    ("prompt-no-chat-template", "if tokenizer.chat_template:", "if False:"),
    ("prompt-thinking-ignored", "enable_thinking=thinking", "enable_thinking=False"),
    ("stop-no-end-of-turn", "tokenizer.eos_token_id, end_of_turn,", "tokenizer.eos_token_id,"),
    ("eval-greedy-is-sampled", "p, g, 1, ecfg, greedy=True)", "p, g, 1, ecfg)"),
    ("eval-same-noise-for-every-chunk", "noise=noise[i * k:(i + len(p)) * k]", "noise=noise[:len(p) * k]"),
    ("metrics-auroc-of-h-not-minus-h", "auroc(-entropy[valid], rewards[valid])", "auroc(entropy[valid], rewards[valid])"),
    ("metrics-token-share-even", "[x / total_tokens for x in tokens]", "[1 / len(tokens) for x in tokens]"),
    ("dist-dapo-no-top-up", "keep[-1] |= (uniform & (uniform.cumsum(0) <= n_prompts - n_mixed))", "keep[-1] |= False"),
    ("resume-noise-not-restored", 'noise_rng.set_state(generators["noise"])', "None"),
    ("resume-logs-not-cut", "for path in paths if resumed else []:", "for path in []:"),
    ("resume-run-id-unchecked", 'if resumed.get("run_id") != run_id or run_id is None:', "if False:"),
    ("signal-one-ctrl-c-skips-the-save", "self.signals.count(signal.SIGINT) < 2", "self.signals.count(signal.SIGINT) < 1"),
]


def part_of(source: str, snippet: str) -> str:
    return "I" if source.index(snippet) < source.index("\n# Part II") else "II"


def run_one(mutation, source: str, pytest_args: list[str], timeout: int) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'timeout' | 'error', seconds, the first failing test): the suite on a
    mutant. Killed: a test failed, or egpo.py did not import; error: pytest's usage, or no test ran."""
    name, old, new = mutation
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        copy = os.path.join(tmp, "repo")
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__",
                                                                   ".pytest_cache", ".ipynb_checkpoints"))
        with open(os.path.join(copy, "egpo.py"), "w") as f:
            f.write(source.replace(old, new))
        with socket.socket() as s:  # torchrun's port: two suites at a time must not share one
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args],
                               cwd=copy, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "PET_MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"})
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, ""
        failed = next((line.split()[1] for line in p.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
        verdict = {0: "survived", 1: "killed", 2: "killed"}.get(p.returncode, "error")
        return verdict, time.perf_counter() - start, failed or p.stdout.strip()[-200:] * (verdict == "error")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--only", default="", help="comma-separated prefixes of the mutations to run (default all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their part, and stop")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at a time (default 2)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a suite may take (default 900)")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments (e.g. -k to run fewer tests)")
    args = parser.parse_args(argv)
    with open(os.path.join(ROOT, "egpo.py")) as f:
        source = f.read()
    missing = [f"{name} ({source.count(old)} places)" for name, old, _ in MUTATIONS if source.count(old) != 1]
    if missing:
        sys.exit("these mutations' snippets are not in egpo.py exactly once: " + ", ".join(missing))
    chosen = [m for m in MUTATIONS if not args.only or m[0].startswith(tuple(args.only.split(",")))]
    if args.list:
        for name, old, new in chosen:
            print(f"Part {part_of(source, old):2s} {name:36s} {old.strip()!r} -> {new.strip()!r}")
        return {}
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for m, (verdict, seconds, failed) in zip(chosen, pool.map(
                lambda m: run_one(m, source, shlex.split(args.pytest_args), args.timeout), chosen)):
            results[m[0]] = (part_of(source, m[1]), verdict)
            print(f"{verdict:9s} {seconds:6.0f} s  Part {results[m[0]][0]:2s} {m[0]:36s} {failed}", flush=True)
    for part in ("I", "II", None):
        mine = [v for p, v in results.values() if part in (None, p)]
        if mine:
            killed = sum(v in ("killed", "timeout") for v in mine)
            print(f"{'Part ' + part if part else 'overall':8s} {killed} of {len(mine)} killed "
                  f"({100 * killed / len(mine):.0f}%)")
    return results


if __name__ == "__main__":
    main()
