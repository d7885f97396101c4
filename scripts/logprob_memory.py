"""Peak memory of the update's log-probs: the full (rows x tokens x vocabulary) logits against egpo.py's
fp32 chunks of LOGIT_CHUNK positions, recomputed in the backward pass.

One micro-batch, forward and backward, each way in a fresh process (peak RSS is per process), on a
model with Qwen2.5-0.5B's vocabulary and hidden size and one decoder layer, random weights:

    python scripts/logprob_memory.py                           # 8 x (64 + 512) tokens: takes a few GiB
    python scripts/logprob_memory.py --vocab 1000 --hidden 64 --intermediate 128 --response 16   # seconds
"""
import argparse
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # egpo.py, from any folder
import egpo  # noqa: E402


def measure(args) -> float:
    """This process's peak RSS above the model, in GiB, after one forward and backward."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=1,
                                      tie_word_embeddings=True))
    ids = torch.randint(0, args.vocab, (args.rows, args.prompt + args.response))
    attn = torch.ones_like(ids)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.how == "full":  # every response position's logits, then an fp32 copy / T
        logits = lm(input_ids=ids, attention_mask=attn, logits_to_keep=args.response + 1).logits[:, :-1].float() / 1.0
        lp = logits.gather(-1, ids[:, -args.response:, None])[..., 0] - logits.logsumexp(-1)
    else:
        lp = egpo.token_logprobs(egpo.Policy(lm), ids, attn, args.response, 1.0)
    lp.sum().backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2 ** 20  # ru_maxrss: KiB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--how", choices=["full", "chunked"], help="measure one way in this process (default: both, "
                                                                   "each in a fresh process)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (default Qwen2.5's 151,936)")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size (default 0.5B's 896)")
    parser.add_argument("--intermediate", type=int, default=4864, help="MLP size (default 4864)")
    parser.add_argument("--rows", type=int, default=8, help="responses in the micro-batch (default 8)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--response", type=int, default=512, help="response tokens (default 512)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.how:
        print(f"{args.how}: {measure(args):.2f} GiB above the model")
        return
    for how in ("full", "chunked"):
        argv_how = list(argv if argv is not None else sys.argv[1:]) + ["--how", how]
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv_how], check=True)


if __name__ == "__main__":
    main()
