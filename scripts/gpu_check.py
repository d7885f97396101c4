"""The GPU check: egpo.py's CUDA path on one GPU, with a model of Qwen2.5-0.5B's shape and random
weights (no hub access needed), stage by stage. After each stage, OUT/gpu_check.json holds every
result so far; a stage that fails is recorded with its error and the tail of its output, and the
next stage runs. Only gpu_check.json goes to OUT: the model and the runs go to --work.

1. model: Qwen2.5-0.5B's shape (494M parameters, 151,936-token vocabulary), egpo.py's tokenizer;
2. train: `egpo.py --device cuda` for --steps RL steps of 8 x 8 responses of --new-tokens tokens (bf16
   autocast): the median step's sampling and update times, tokens/s, gpu_peak_mem_gib, clip_frac;
3. resume: the same run stopped after step 1 and resumed: the largest weight difference to the
   straight run (CUDA kernels need not be bit-exact);
4. kv_cache: its keys' and values' dtypes under bf16 autocast (both bf16);
5. left_padding: a left-padded batch of prompts of 3 to 40 tokens, greedy: egpo.sample against
   generate (the share of equal tokens), and sampled: the gap between the sampler's log-probs (which
   feed Eq. 5) and the update's, recomputed (mean and max, in nats);
6. casts: the weights cast to bf16 at the first token and at the tokens after it (0: one autocast);
7. fsdp_bf16: FSDP on one process (NCCL): the bf16 copy sampling uses under --fsdp --bf16 equals
   the fp32 weights cast to bf16, and samples;
8. sampler_vs_generate: generated tokens/s of each (scripts/sampler_vs_generate.py).

    python scripts/gpu_check.py                                # about 5 minutes on one H100; OUT=$OUT
    python scripts/gpu_check.py --device cpu --shape tiny      # the same code on the CPU, in seconds
    python scripts/gpu_check.py --only train,casts             # some stages only
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
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # egpo.py and sampler_vs_generate.py, from any folder
import egpo  # noqa: E402
import sampler_vs_generate  # noqa: E402

SHAPES = {"0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151936),
          "tiny": dict(egpo.TINY_CONFIG, num_hidden_layers=1)}  # not a checkpoint of the tiny model: real defaults


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script")
    parser.add_argument("--shape", choices=list(SHAPES), default="0.5b", help="the model's shape (default 0.5b)")
    parser.add_argument("--steps", type=int, default=5, help="RL steps of the run (default 5)")
    parser.add_argument("--new-tokens", type=int, default=256, help="response length (default 256)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu-check"),
                        help="where gpu_check.json goes (default $OUT, else runs/gpu-check)")
    parser.add_argument("--work", default=None, help="folder of the model and the runs (default: a temporary one)")
    parser.add_argument("--only", default=None, help="these stages (comma-separated; the model is made first)")
    parser.add_argument("--fail", default=None, help="make this stage fail (to try the report)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("this check needs a GPU: CUDA is not available here (--device cpu --shape tiny tries the script)")
    import transformers

    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="egpo-gpu-check-")
    device, model = torch.device(args.device), os.path.join(work, "model")
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "work": work}
    run = ["--model", model, "--dataset", "toy", "--device", args.device, "--max-new-tokens", str(args.new_tokens),
           "--eval-size", "0", "--overwrite"]

    def stage(name, fn):
        """fn() as the stage `name`: its result, or its error and the tail of its output, then the report."""
        print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
        out, start = io.StringIO(), time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                if name == args.fail:
                    raise RuntimeError("failed on purpose (--fail)")
                report[name] = fn()
        except (Exception, SystemExit) as e:  # egpo.main exits with 2 on its one-line errors
            report[name] = {"error": f"{type(e).__name__}: {e}",
                            "output_tail": (out.getvalue() + traceback.format_exc())[-4000:]}
        report[name + " seconds"] = round(time.perf_counter() - start, 1)
        with open(os.path.join(args.out, "gpu_check.json.tmp"), "w") as f:
            f.write(egpo.to_json(report, indent=2))
        os.replace(os.path.join(args.out, "gpu_check.json.tmp"), os.path.join(args.out, "gpu_check.json"))
        print(f"{time.strftime('%H:%M:%S')} {name}: {egpo.to_json(report[name])[:300]}", flush=True)

    def save_model():
        from transformers import Qwen2Config, Qwen2ForCausalLM

        _, tok = egpo.build_tiny_model(0)
        torch.manual_seed(0)
        config = Qwen2Config(**{**SHAPES[args.shape], "tie_word_embeddings": True, "pad_token_id": tok.pad_token_id,
                                "eos_token_id": tok.eos_token_id})
        lm = Qwen2ForCausalLM(config)
        lm.save_pretrained(model)
        tok.save_pretrained(model)
        return {"parameters": sum(p.numel() for p in lm.parameters())}

    def train():
        egpo.main(run + ["--steps", str(args.steps), "--out", os.path.join(work, "straight")])
        with open(os.path.join(work, "straight", "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f][1:] or [{}]  # step 1 includes CUDA's warm-up
        keys = ("time_sample", "time_update", "tokens_per_s", "gpu_peak_mem_gib", "clip_frac")
        return {f"median {k}": statistics.median(r.get(k, float("nan")) for r in steps) for k in keys}

    def resume():
        from safetensors.torch import load_file

        stopped = os.path.join(work, "stopped")
        egpo.main(run + ["--steps", "1", "--out", stopped])
        egpo.main(["--resume", stopped, "--steps", str(args.steps)])
        a, b = (load_file(os.path.join(work, d, "checkpoint", "model.safetensors")) for d in ("straight", "stopped"))
        return {"max weight difference to the straight run": max((a[k] - b[k]).abs().max().item() for k in a)}

    cfg = egpo.resolve(egpo.Config(model=model, device=args.device, bf16=args.device == "cuda" or None,
                                   max_new_tokens=32, out=os.path.join(work, "unused")))

    def policy():
        return egpo.load_policy(cfg, device)

    def kv_cache():
        lm = policy()[0]
        ids = torch.randint(3, 90, (4, 10), device=device)
        with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16):
            _, cache = lm(ids, torch.ones_like(ids), torch.arange(10, device=device).expand(4, -1), 1.0)
        return {"dtypes": sorted({str(x.dtype) for layer in cache.layers for x in (layer.keys, layer.values)})}

    def left_padding():
        lm, tok = policy()
        prompts = [torch.randint(3, 90, (n,)).tolist() for n in (3, 10, 25, 40)]
        batch = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(device)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=cfg.bf16):
            theirs = lm.lm.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=32,
                                    min_new_tokens=32, eos_token_id=1, pad_token_id=0)[:, ids.shape[1]:]
        ours = egpo.sample(lm, ids, attn, [], 0, 32, bf16=cfg.bf16)[0]
        rollout = egpo.rollout(lm, tok, prompts, ["0"] * 4, 2, cfg)  # sampled, 2 per prompt
        n = rollout["response_mask"].shape[1]
        with torch.no_grad():
            update = egpo.token_logprobs(lm, rollout["input_ids"], rollout["attention_mask"], n, cfg.temperature,
                                         cfg.bf16)
        gap = (rollout["logprobs"] - update)[rollout["response_mask"]].abs()
        return {"greedy tokens equal to generate's": (ours == theirs).float().mean().item(),
                "sampler - update log-prob gap, mean (nats)": gap.mean().item(), "max (nats)": gap.max().item()}

    def casts():
        lm = policy()[0]
        shapes = {tuple(p.shape) for p in lm.parameters()}
        ids = torch.randint(3, 90, (4, 10), device=device)

        def count(tokens):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                egpo.sample(lm, ids, torch.ones_like(ids), [], 0, tokens, bf16=True)
            return sum(e.name == "aten::_to_copy" and tuple(e.input_shapes[0]) in shapes for e in prof.events())

        autocast = egpo.autocast
        if args.device == "cpu":  # egpo.py autocasts on CUDA only: here on the CPU as it would there
            egpo.autocast = lambda device, bf16: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        try:
            first, four = count(1), count(4)
        finally:
            egpo.autocast = autocast
        return {"weight casts at the first token": first, "at each token after it": (four - first) / 3}

    def fsdp_bf16():
        from torch.distributed.fsdp import fully_shard

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
        torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
        try:
            lm, tok = policy()  # the copy: bf16 weights but for the output layer, fp32 (and untied)
            expected = {k: v.to(torch.bfloat16) for k, v in lm.named_parameters()}
            expected["lm.lm_head.weight"] = lm.lm.lm_head.weight.detach().clone()
            for layer in lm.lm.model.layers:
                fully_shard(layer)
            fully_shard(lm)
            with egpo.full_weights(lm, bf16=True) as copy:
                got = dict(copy.named_parameters())
                equal = got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
                ids = torch.randint(3, 90, (4, 10), device=device)
                tokens = egpo.sample(copy, ids, torch.ones_like(ids), [], 0, 8, bf16=True)[0]
                return {"bf16 copy equals the weights cast to bf16": equal, "tokens": list(tokens.shape),
                        "gathered GiB": sum(x.numel() * x.element_size() for x in got.values()) / 2 ** 30}
        finally:
            torch.distributed.destroy_process_group()

    def speed():
        hf, ours = sampler_vs_generate.main(["--model", model, "--device", args.device, "--new-tokens",
                                             str(args.new_tokens)])
        return {"generated tokens/s: generate": round(hf), "egpo.sample": round(ours)}

    for name, fn in [("model", save_model), ("train", train), ("resume", resume), ("kv_cache", kv_cache),
                     ("left_padding", left_padding), ("casts", casts), ("fsdp_bf16", fsdp_bf16),
                     ("sampler_vs_generate", speed)]:
        if name == "model" or not args.only or name in args.only.split(","):
            stage(name, fn)
    return report


if __name__ == "__main__":
    main()
