"""The GPU check: egpo.py's CUDA path on one GPU, with a model of Qwen2.5-0.5B's shape and random
weights (no hub access needed), and the numbers the README's GPU section asks for.

1. the model: Qwen2.5-0.5B's shape (494M parameters, 151,936-token vocabulary), egpo.py's character
   tokenizer, saved to OUT/model;
2. `egpo.py --model OUT/model --device cuda` for --steps RL steps of 8 x 8 responses of --new-tokens
   tokens (bf16 autocast): the median step, sampling and update times, tokens/s, gpu_peak_mem_gib,
   and clip_frac (0: the first PPO ratio is 1 on CUDA too);
3. the same run stopped after step 1 and resumed (--resume): it must finish, and the largest weight
   difference to the straight run is reported (CUDA kernels need not be bit-exact);
4. the sampler's KV cache under bf16 autocast: keys and values both bf16;
5. egpo.sample against transformers' generate (scripts/sampler_vs_generate.py).

It needs a GPU (--device cuda). `--device cpu --shape tiny` runs the same code on the tiny model, in
seconds: the tests do that.

    python scripts/gpu_check.py --out /tmp/gpu                 # about 5 minutes on one GPU
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # egpo.py and sampler_vs_generate.py, from any folder
import egpo  # noqa: E402
import sampler_vs_generate  # noqa: E402

SHAPES = {"0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151936),
          "tiny": dict(egpo.TINY_CONFIG, num_hidden_layers=1)}  # not a checkpoint of the tiny model: real defaults


def quiet_main(argv: list[str]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        egpo.main(argv)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script")
    parser.add_argument("--shape", choices=list(SHAPES), default="0.5b", help="the model's shape (default 0.5b)")
    parser.add_argument("--steps", type=int, default=5, help="RL steps of the run (default 5)")
    parser.add_argument("--new-tokens", type=int, default=256, help="response length (default 256)")
    parser.add_argument("--only", choices=["model"], help="model: only write OUT/model")
    parser.add_argument("--out", default="runs/gpu-check", help="folder (default runs/gpu-check)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("this check needs a GPU: CUDA is not available here (--device cpu --shape tiny tries the script)")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tok = egpo.build_tiny_model(0)
    path = os.path.join(args.out, "model")
    torch.manual_seed(0)
    config = Qwen2Config(**{**SHAPES[args.shape], "tie_word_embeddings": True, "pad_token_id": tok.pad_token_id,
                            "eos_token_id": tok.eos_token_id})
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    if args.only:
        return
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
    run = ["--model", path, "--dataset", "toy", "--device", args.device, "--max-new-tokens", str(args.new_tokens),
           "--eval-size", "0", "--overwrite"]
    quiet_main(run + ["--steps", str(args.steps), "--out", os.path.join(args.out, "straight")])
    with open(os.path.join(args.out, "straight", "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f][1:] or None  # step 1 includes CUDA's warm-up
    for key in ("time_sample", "time_update", "tokens_per_s", "gpu_peak_mem_gib", "clip_frac"):
        report[f"median {key}"] = statistics.median(r.get(key, float("nan")) for r in steps) if steps else None
    stopped = os.path.join(args.out, "stopped")
    quiet_main(run + ["--steps", "1", "--out", stopped])
    quiet_main(["--resume", stopped, "--steps", str(args.steps)])
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(args.out, d, "checkpoint", "model.safetensors")) for d in ("straight", "stopped"))
    report["resumed: max weight difference to the straight run"] = max((a[k] - b[k]).abs().max().item() for k in a)
    policy, _ = egpo.load_policy(egpo.resolve(egpo.Config(model=path, device=args.device)), torch.device(args.device))
    ids = torch.randint(3, 90, (4, 10), device=args.device)
    attn = torch.ones_like(ids)
    with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16):
        _, cache = policy(ids, attn, attn.cumsum(1) - 1, 1.0)
    report["KV cache dtypes under bf16 autocast"] = sorted({str(x.dtype) for layer in cache.layers
                                                           for x in (layer.keys, layer.values)})
    hf, ours = sampler_vs_generate.main(["--model", path, "--device", args.device, "--new-tokens", str(args.new_tokens)])
    report["generated tokens/s: generate, egpo.sample"] = [round(hf), round(ours)]
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        f.write(egpo.to_json(report, indent=2))
    print(egpo.to_json(report, indent=2))


if __name__ == "__main__":
    main()
