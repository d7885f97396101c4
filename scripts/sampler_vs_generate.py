"""Generated tokens per second of egpo.sample against transformers' generate(), in one process.

Both sample the same batch from the same model for the same number of new tokens (a random model
rarely stops early, so every row runs to the end); the last of --rounds timings counts.

    python scripts/sampler_vs_generate.py                      # CPU: the tiny model, fp32, one thread, 64 x 32
    python scripts/gpu_check.py --only model --work /tmp/gpu    # then, on a GPU, with a 0.5B-shaped model:
    python scripts/sampler_vs_generate.py --model /tmp/gpu/model --device cuda --new-tokens 256
"""
import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # egpo.py, from any folder
import egpo  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="tiny", help="tiny, or a local model folder (default tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--rows", type=int, default=64, help="sequences sampled at once (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="prompt length (default 100)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per row (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="timings of each; the last counts (default 3)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    lm = egpo.build_tiny_model(0)[0] if args.model == "tiny" else AutoModelForCausalLM.from_pretrained(args.model)
    lm = lm.to(args.device).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (args.rows, args.prompt_tokens), device=args.device)
    attn = torch.ones_like(ids)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def tokens_per_s(run):
        for _ in range(args.rounds):  # the first warms CUDA up
            sync()
            t = time.perf_counter()
            n = run()
            sync()
        return n / (time.perf_counter() - t)

    # on CUDA both run under one bf16 autocast for the whole generation (egpo.sample enters its own)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
        hf = tokens_per_s(lambda: args.rows * (lm.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, eos_token_id=1, pad_token_id=0).shape[1] - args.prompt_tokens))
    ours = tokens_per_s(lambda: egpo.sample(egpo.Policy(lm), ids, attn, [1], 0, args.new_tokens, bf16=cuda,
                                            noise=torch.rand(args.rows, args.new_tokens, device=args.device))[0].numel())
    print(f"{args.device}: generated tokens/s, generate {hf:,.0f}, egpo.sample {ours:,.0f} ({ours / hf:.2f}x)")
    return hf, ours


if __name__ == "__main__":
    main()
