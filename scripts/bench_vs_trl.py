"""Seconds per RL step of egpo.py against TRL's GRPOTrainer, on the same locally built tiny model.

Both sides load one saved copy of egpo.py's tiny model (a 0.14M-parameter Qwen2, character
tokenizer), see the same prompt text, and run the same batch: 4 prompts x 8 responses of at most 32
new tokens, lr 1e-6, no KL, fp32, one thread. TRL's step is timed from on_step_begin to
on_step_end; egpo.py's is time_sample + time_update from its metrics.jsonl. Each side's first step
is a warm-up, left out; the two sides alternate --rounds times, so that a slow spell of the machine
hits both alike. The medians are compared.

TRL is not a dependency of egpo.py: `pip install trl` for the comparison. Without it, this times
egpo.py's side only and says so.

    python scripts/bench_vs_trl.py                  # 2 rounds of 9 steps a side
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # egpo.py, from any folder
import egpo  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", type=int, default=9, help="RL steps per run and side, the first a warm-up (default 9)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = tempfile.mkdtemp()
    model, tok = egpo.build_tiny_model(0)
    model.save_pretrained(f"{work}/model")
    tok.save_pretrained(f"{work}/model")
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(10 + i % 90, 10 + 7 * i % 90) for i in range(300)]]
    with open(f"{work}/data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    def egpo_steps():
        out = tempfile.mkdtemp(dir=work)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            egpo.main(["--model", f"{work}/model", "--dataset", f"{work}/data.jsonl", "--steps", str(args.steps),
                       "--prompts-per-step", "4", "--group-size", "8", "--max-new-tokens", "32", "--lr", "1e-6",
                       "--eval-size", "0", "--device", "cpu", "--out", out])
        with open(f"{out}/metrics.jsonl") as f:
            return [r["time_sample"] + r["time_update"] for r in map(json.loads, f)][1:]

    try:
        import trl  # noqa: F401
    except ImportError:
        trl_steps = None
        print("TRL is not installed (pip install trl): timing egpo.py's side only")
    else:
        trl_steps = trl_runner(work, tok, rows, args.steps)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours += egpo_steps()
        theirs += trl_steps() if trl_steps else []
    line = f"seconds per RL step, median of {len(ours)}: egpo.py {statistics.median(ours):.3f}"
    if theirs:
        line += f", TRL GRPOTrainer {statistics.median(theirs):.3f}; egpo.py / TRL = " \
                f"{statistics.median(ours) / statistics.median(theirs):.2f}"
    print(line)


def trl_runner(work: str, tok, rows: list, steps: int):
    """A function that trains TRL's GRPOTrainer for `steps` steps and returns its step times."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Timer(TrainerCallback):  # TRL's step: generation, reward, loss, backward, optimizer step
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    prompts = [tok.decode(egpo.build_prompt(tok, r["question"], "file")) for r in rows]  # the text egpo.py sends
    config = GRPOConfig(output_dir=f"{work}/trl", per_device_train_batch_size=32, num_generations=8,
                        max_completion_length=32, max_steps=steps, learning_rate=1e-6, beta=0.0, temperature=1.0,
                        use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", report_to="none",
                        disable_tqdm=True, seed=0)

    def run():
        timer = Timer()
        timer.times = []
        GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(f"{work}/model"), processing_class=tok, args=config,
                    reward_funcs=lambda completions, answer, **_: [egpo.verify(c, a) for c, a in zip(completions, answer)],
                    train_dataset=Dataset.from_list([{"prompt": p, "answer": r["answer"]} for p, r in zip(prompts, rows)]),
                    callbacks=[timer]).train()
        return timer.times[1:]
    return run


if __name__ == "__main__":
    main()
