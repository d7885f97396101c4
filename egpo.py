"""EGPO: entropy-calibrated group policy optimisation, in one readable file.

Paper: Qiannian Zhao et al., "Know What You Know: Metacognitive Entropy Calibration for
Verifiable RL Reasoning", arXiv:2602.22751 (equation numbers below are the paper's). EGPO is
GRPO (outcome reward, group-normalised advantages, PPO-clip update) in which each response's
advantage is scaled by how confident the model was when it wrote it, and in which a group of
only wrong answers is pushed down instead of ignored. The verifier and the 0/1 reward are unchanged.

    python egpo.py                              # offline demo: tiny model, toy task, CPU, < 1 min
    python egpo.py --algo grpo                  # the same run with plain GRPO (also dapo, edge-grpo)
    python egpo.py --calibration symmetric      # an ablation of the paper's Table 2 (C1)
    python egpo.py --model Qwen2.5-0.5B         # a real model on GSM8K (CUDA, bf16 autocast)
    torchrun --nproc_per_node 8 egpo.py --model Qwen2.5-Math-7B --fsdp   # 8 GPUs, model sharded (FSDP2)
    python egpo.py --help                       # every flag, with its default

The file reads in the order of one training step (Algorithm 1) and of the paper:
config -> task & verifier -> model -> sampling -> entropy proxy (Eq. 5) -> advantages
(Eq. 2, Eqs. 7-11, 13) -> policy loss (Eq. 12) -> metrics -> several processes -> training
loop -> main.
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import string
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm  # tqdm ships with transformers and datasets


# ====================================================================================
# 1. Config: one dataclass; the command line is generated from it (see `parse_args`).
#    A default of None means "auto": the tiny offline demo and real models differ.
# ====================================================================================
def flag(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # --- run control
    model: str = flag("tiny", "'tiny' (built locally), an alias such as Qwen2.5-0.5B, a hub id, or a local dir")
    dataset: str = flag(None, "toy | gsm8k | math500 | openr1 (OpenR1-Math-220k, the paper's) | a local "
                              ".jsonl/.json/.parquet/.csv with question, answer columns; NAME=PATH reads a local copy "
                              "of a hub dataset in its own schema [auto: toy for tiny, gsm8k for real models]")
    device: str = flag("auto", "auto | cpu | cuda [auto: cpu for the tiny demo, cuda for real models "
                               "when available]", ["auto", "cpu", "cuda"])
    seed: int = flag(0, "seed for model init, data, sampling")
    out: str = flag(None, "output dir for metrics.jsonl, config.json, summary.json, checkpoint/ "
                          "[auto: runs/<time>-<algo>-<model>]")
    steps: int = flag(None, "RL steps; 0 = only the warm-up and its evaluation, e.g. to train several "
                            "methods from one warmed-up checkpoint [auto: 100 for tiny, 200 for real models]")
    # --- the algorithm (paper Section 3; Table 1's baselines are --algo values, Table 2's ablations flags)
    algo: str = flag("egpo", "egpo | grpo | dapo (clip-higher, token-mean, dynamic sampling) | edge-grpo "
                             "(full-distribution entropy, symmetric clamp 0.5-2.0, no NSR)",
                     ["egpo", "grpo", "dapo", "edge-grpo"])
    calibration: str = flag("asymmetric", "Eq. 8's clamp: asymmetric (EGPO) | symmetric (C1) | neg-only (C2) | "
                                          "pos-only (C3); egpo only",
                            ["asymmetric", "symmetric", "neg-only", "pos-only"])
    lambda_min: float = flag(0.8, "Eq. 8: lower clamp of the confidence weight, in (0, 1]; egpo only")
    lambda_max: float = flag(2.0, "Eq. 8: upper clamp of the confidence weight, >= 1; egpo only")
    nsr: str = flag("entropy", "all-wrong groups (Eqs. 10, 13): entropy (A~ = -w) | flat (C4: A~ = -1) | "
                               "off (0, as GRPO); egpo only", ["entropy", "flat", "off"])
    renorm: str = flag("none", "Eq. 9, w / mean(w) over the group: none | after-clamp (C5) | before-clamp (C6); "
                               "egpo only", ["none", "after-clamp", "before-clamp"])
    entropy_span: str = flag("response", "tokens of the entropy proxy (Eq. 5): response | answer (after the "
                                         "last </think>, else the whole response; paper RQ4); under another "
                                         "--algo: only the logged entropies",
                             ["response", "answer"])
    max_resample: int = flag(10, "dapo: at most this many sampling rounds per step to fill the batch with "
                                 "mixed groups (verl: max_num_gen_batches)")
    # --- sampling
    prompts_per_step: int = flag(8, "B: prompts per RL step")
    group_size: int = flag(8, "G: responses per prompt (TRL: num_generations)")
    max_new_tokens: int = flag(None, "longest response [auto: 40 for tiny, 512 for real models]")
    temperature: float = flag(1.0, "sampling temperature T (log-probs use logits / T too)")
    top_p: float = flag(1.0, "nucleus sampling mass (1.0 = off)")
    top_k: int = flag(0, "sample from the k likeliest tokens only (0 = off)")
    thinking: bool = flag(False, "Qwen3 chat template: let the model think (<think>...</think>) before "
                                 "answering; off = the template's non-thinking mode")
    # --- update
    lr: float = flag(None, "AdamW learning rate [auto: 1e-4 for tiny, 1e-6 for real models]")
    beta: float = flag(0.0, "weight of the k3 KL to a frozen copy of the initial policy (0 = no reference model)")
    clip_eps_low: float = flag(0.2, "PPO clip: ratio >= 1 - clip_eps_low (TRL: epsilon)")
    clip_eps_high: float = flag(None, "PPO clip: ratio <= 1 + clip_eps_high (TRL: epsilon_high) "
                                      "[auto: 0.28 for dapo (clip-higher), else 0.2]")
    loss_agg: str = flag("token-mean", "token-mean (TRL dapo/bnpo) | seq-mean-token-mean (TRL grpo)",
                         ["token-mean", "seq-mean-token-mean"])
    mu: int = flag(1, "optimizer steps on each sampled batch (PPO epochs)")
    max_grad_norm: float = flag(1.0, "gradient-norm clipping (0 = none)")
    micro_batch_size: int = flag(None, "responses per forward/backward; gradients accumulate "
                                       "[auto: see --micro-batch-tokens]")
    micro_batch_tokens: int = flag(None, "unless --micro-batch-size is given: as many responses per forward/backward "
                                         "as fit this many tokens, prompt and padding included (verl: "
                                         "ppo_max_token_len_per_gpu) [auto: whole batch for tiny, 8192 for real models]")
    gradient_checkpointing: bool = flag(False, "trade compute for memory in the update (real models)")
    fsdp: bool = flag(False, "under torchrun, shard parameters, gradients and optimizer state over the "
                             "processes (FSDP2) instead of a full copy each (DDP)")
    bf16: bool = flag(None, "on CUDA, bf16 autocast over fp32 weights (TRL: bf16=True); --no-bf16 = fp32 "
                            "[auto: on for real models on CUDA, else off]")
    # --- tiny model and toy task
    sft_steps: int = flag(None, "supervised warm-up steps on worked solutions, at most (see --sft-target) "
                                "[auto: 500 x --toy-digits for tiny+toy, else 0]")
    sft_target: float = flag(0.5, "stop the warm-up once greedy accuracy on 64 training problems reaches this "
                                  "(0 = always run --sft-steps)")
    sft_lr: float = flag(3e-3, "learning rate of the warm-up")
    sft_batch_size: int = flag(64, "batch size of the warm-up")
    toy_digits: int = flag(2, "operand digits of the toy addition task (3 = harder: many all-wrong groups)")
    # --- evaluation and checkpoints
    eval_datasets: str = flag(None, "evaluate on these benchmarks instead of the held-out split, comma-separated: "
                                    "math500, aime24, minerva, gsm8k, mmlu-stem (the paper's), a local file with "
                                    "question, answer columns, or NAME=PATH (a local copy in the hub's schema)")
    eval_samples: int = flag(None, "k: sampled answers per problem; pass@1 is their mean accuracy [auto: 1 for tiny, "
                                   "8 for real models (the paper's)]")
    eval_temperature: float = flag(None, "evaluation sampling temperature [auto: --temperature for tiny, 0.6]")
    eval_top_p: float = flag(None, "evaluation top-p [auto: --top-p for tiny, 0.95]")
    eval_top_k: int = flag(None, "evaluation top-k [auto: --top-k for tiny, 20]")
    eval_max_new_tokens: int = flag(None, "longest evaluation answer [auto: --max-new-tokens]")
    eval_every: int = flag(None, "evaluation every N steps; 0 = only before and after RL "
                                 "[auto: 0 for tiny, 50 for real models]")
    eval_size: int = flag(200, "held-out problems of the training set (0 = none); benchmarks are evaluated whole")
    save_every: int = flag(None, "write checkpoint/ every N steps; 0 = only at the end or on Ctrl-C "
                                 "[auto: 0 for tiny, 50 for real models]")
    log_completions: bool = flag(False, "also write completions.jsonl: every sampled response with its "
                                        "reward, entropy proxy, GRPO and EGPO advantage (TRL: log_completions)")
    resume: str = flag(None, "continue the run in this folder from its last checkpoint, with its config "
                             "(only --steps and --save-every may be given again)")


# Values of the "auto" (None) defaults: (tiny offline demo, real models).
AUTO = {
    "steps": (100, 200), "max_new_tokens": (40, 512), "lr": (1e-4, 1e-6), "micro_batch_tokens": (None, 8192),
    "eval_every": (0, 50), "save_every": (0, 50), "eval_samples": (1, 8),
}
ALIASES = {name: "Qwen/" + name for name in [
    "Qwen2.5-0.5B", "Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B", "Qwen2.5-1.5B-Instruct", "Qwen2.5-3B",
    "Qwen2.5-3B-Instruct", "Qwen2.5-7B", "Qwen2.5-7B-Instruct", "Qwen2.5-Math-1.5B", "Qwen2.5-Math-7B",
    "Qwen2.5-Math-1.5B-Instruct", "Qwen2.5-Math-7B-Instruct", "Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B"]}
TIME_KEYS = ("time_sample", "time_update", "tokens_per_s")  # the only metrics that vary between identical runs
RESUMABLE = ("steps", "save_every")  # the flags a resumed run may change: they change none of its numbers


class UserError(Exception):
    """Bad input: main() prints it as one line and exits with code 2."""


def is_tiny(model: str) -> bool:
    """'tiny', or a checkpoint of it: a local directory whose config and character tokenizer are
    those build_tiny_model makes (read as JSON; nothing is loaded)."""
    if model == "tiny":
        return True
    try:
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(model, "tokenizer.json")) as f:
            vocab = json.load(f)["model"].get("vocab")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return vocab == {token: i for i, token in enumerate(TINY_VOCAB)} and config.get("model_type") == "qwen2" and \
        all(config.get(k) == v for k, v in TINY_CONFIG.items())


def resolve(cfg: Config) -> Config:
    """Fill the auto defaults and check every value a user can get wrong (before any model loads)."""
    tiny = is_tiny(cfg.model)
    for name, (tiny_value, real_value) in AUTO.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, tiny_value if tiny else real_value)
    if cfg.dataset is None:
        cfg.dataset = "toy" if tiny else "gsm8k"
    if cfg.device == "auto":  # the tiny demo is as fast on a CPU, and its numbers in the README are CPU numbers
        cfg.device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    if cfg.bf16 and cfg.device != "cuda":
        raise UserError(f"--bf16 autocasts on CUDA only, and this run is on --device {cfg.device}: drop --bf16")
    if cfg.bf16 is None:  # config.json records what is in effect
        cfg.bf16 = cfg.device == "cuda" and not tiny
    if cfg.sft_steps is None:  # a checkpoint of the tiny model is warmed up already
        cfg.sft_steps = 500 * cfg.toy_digits if cfg.model == "tiny" and cfg.dataset == "toy" else 0
    paper = {"eval_temperature": ("temperature", 0.6), "eval_top_p": ("top_p", 0.95), "eval_top_k": ("top_k", 20),
             "eval_max_new_tokens": ("max_new_tokens", None)}  # the paper's evaluation protocol (Section 4.1)
    for name, (training, value) in paper.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, getattr(cfg, training) if tiny or value is None else value)
    if cfg.clip_eps_high is None:
        cfg.clip_eps_high = 0.28 if cfg.algo == "dapo" else 0.2
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    egpo_only = [f"--{k.replace('_', '-')}" for k in ("calibration", "lambda_min", "lambda_max", "nsr", "renorm")
                 if getattr(cfg, k) != defaults[k]]
    if cfg.algo != "egpo" and egpo_only:
        raise UserError(f"{', '.join(egpo_only)}: EGPO's calibration, which does nothing under --algo {cfg.algo}; "
                        "drop it or use --algo egpo")
    if cfg.algo != "dapo" and cfg.max_resample != defaults["max_resample"]:
        raise UserError(f"--max-resample: DAPO's dynamic sampling, which does nothing under --algo {cfg.algo}; "
                        "drop it or use --algo dapo")
    checks = [
        (cfg.group_size >= 2, f"--group-size must be >= 2 (got {cfg.group_size}): a group of one has no "
                              "baseline to compare against"),
        (cfg.prompts_per_step >= 1, f"--prompts-per-step must be >= 1 (got {cfg.prompts_per_step})"),
        (cfg.steps >= 0, f"--steps must be >= 0 (got {cfg.steps})"),
        (0 < cfg.lambda_min <= 1, f"--lambda-min must be in (0, 1] (got {cfg.lambda_min}): "
                                  "a failure is never penalised more than GRPO would"),
        (cfg.lambda_max >= 1, f"--lambda-max must be >= 1 (got {cfg.lambda_max}): "
                              "a correct answer is never down-weighted"),
        (cfg.temperature > 0, f"--temperature must be > 0 (got {cfg.temperature})"),
        (0 < cfg.top_p <= 1 and 0 < cfg.eval_top_p <= 1, "--top-p and --eval-top-p must be in (0, 1]"),
        (cfg.top_k >= 0 and cfg.eval_top_k >= 0, "--top-k and --eval-top-k must be >= 0"),
        (cfg.eval_temperature > 0, f"--eval-temperature must be > 0 (got {cfg.eval_temperature})"),
        (cfg.eval_samples >= 1 and cfg.eval_max_new_tokens >= 1,
         "--eval-samples and --eval-max-new-tokens must be >= 1"),
        (cfg.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {cfg.max_new_tokens})"),
        (cfg.lr > 0, f"--lr must be > 0 (got {cfg.lr})"),
        (cfg.beta >= 0, f"--beta must be >= 0 (got {cfg.beta}): it weighs a KL penalty"),
        (0 <= cfg.clip_eps_low < 1, f"--clip-eps-low must be in [0, 1) (got {cfg.clip_eps_low}): the ratio's "
                                    "lower clip is 1 - clip_eps_low > 0"),
        (cfg.clip_eps_high >= 0, f"--clip-eps-high must be >= 0 (got {cfg.clip_eps_high}): the ratio's upper "
                                 "clip is 1 + clip_eps_high >= 1"),
        (cfg.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 = no clipping; got {cfg.max_grad_norm})"),
        (cfg.mu >= 1, f"--mu must be >= 1 (got {cfg.mu})"),
        (cfg.max_resample >= 1, f"--max-resample must be >= 1 (got {cfg.max_resample})"),
        (cfg.micro_batch_size is None or cfg.micro_batch_size >= 1,
         f"--micro-batch-size must be >= 1 (got {cfg.micro_batch_size}); leave it out to size by tokens"),
        (cfg.micro_batch_tokens is None or cfg.micro_batch_tokens >= 1,
         f"--micro-batch-tokens must be >= 1 (got {cfg.micro_batch_tokens})"),
        (cfg.eval_size >= 0 and cfg.eval_every >= 0, "--eval-size and --eval-every must be >= 0"),
        (cfg.sft_steps >= 0 and cfg.save_every >= 0, "--sft-steps and --save-every must be >= 0"),
        (cfg.toy_digits >= 1, "--toy-digits must be >= 1"),
        (0 <= cfg.sft_target <= 1, f"--sft-target is an accuracy in [0, 1] (got {cfg.sft_target})"),
        (cfg.device != "cuda" or torch.cuda.is_available(),
         "--device cuda was asked for but CUDA is not available here: use --device cpu (or auto)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return cfg


# ====================================================================================
# 2. Task and verifier: extract the final answer, compare it mathematically with gold.
# ====================================================================================
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_TOKEN = re.compile(r"[^\s${}]*")  # the answer of '\boxed 5'


def _brace_pairs(s: str) -> dict[int, int]:
    """{index of each '{': index of its matching '}'}, in one pass; unmatched braces are left out."""
    pairs, opened = {}, []
    for i, c in enumerate(s):
        if c == "{":
            opened.append(i)
        elif c == "}" and opened:
            pairs[opened.pop()] = i
    return pairs


def extract_answer(text: str) -> str | None:
    """The last non-empty \\boxed{...} (nested braces allowed; \\fbox too), else the text
    after the last '####' up to the end of its line, else None."""
    if not isinstance(text, str):
        return None
    boxes = list(_BOXED.finditer(text))
    pairs = _brace_pairs(text) if boxes else {}
    for match in reversed(boxes):
        start = match.end()
        if text[start:start + 1] == "{":  # an unbalanced box gives '' and is skipped, like an empty one
            answer = text[start + 1:pairs.get(start, start)].strip()
        else:  # \boxed 5
            answer = _TOKEN.match(text, start).group()
        if answer:
            return answer
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip() or None
    return None


_NUM = r"\d+(?:\.\d*)?|\.\d+"
_RATIO = re.compile(rf"([-+]?{_NUM})\s*/\s*([-+]?{_NUM})")
_FRAC = re.compile(rf"(\d*)\s*\\frac\s*(?:\{{\s*([-+]?{_NUM})\s*\}}|(\d))\s*(?:\{{\s*([-+]?{_NUM})\s*\}}|(\d))")
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textnormal|mbox|mathrm|mathbf|operatorname)\s*(?=\{)")
_SPACING = re.compile(r"\\\\|\\[,;: ]|~|\\(?:left|right)(?![A-Za-z])")  # a row break \\ is kept as it is
_THOUSANDS = re.compile(r"(?<![\d.,])[1-9]\d{0,2}(?:,\d{3})+(?![\d,])")  # 1,234,567 (and 12,345.5)
_POWER = r"(?:\^\{?\d\}?|[²³])?"  # cm^2, m²
_LAST_WORD = re.compile(rf"(?<![A-Za-z])([A-Za-z]+){_POWER}$")  # starts only where a word starts: linear
_UNITS = set("""mm cm m km g kg mg lb lbs oz s sec secs second seconds min mins minute minutes hr hrs
hour hours day days week weeks month months year years dollar dollars cent cents unit units meter meters
metre metres inch inches ft foot feet yd yard yards mile miles mph kph degree degrees ml l liter liters litre
litres gallon gallons sq square cubic per""".split())


def _strip_outer_braces(s: str) -> str:
    """'{{5}}' -> '5', every layer in one pass (5,000 nested braces cost no more than one)."""
    pairs, k = _brace_pairs(s) if s.startswith("{") else {}, 0
    while pairs.get(k) == len(s) - 1 - k > k:
        k += 1
    return s[k:len(s) - k].strip()


def _unwrap(s: str) -> str:
    """'\\text{\\textbf{5} cm}' -> '5 cm': every text wrapper, nested ones too, in one pass."""
    starts = list(_WRAPPER.finditer(s))
    pairs = _brace_pairs(s) if starts else {}
    cuts = sorted(cut for m in starts if m.end() in pairs for cut in ((m.start(), m.end() + 1),
                                                                     (pairs[m.end()], pairs[m.end()] + 1)))
    kept, i = [], 0
    for a, b in cuts:
        kept.append(s[i:a])
        i = b
    return "".join(kept) + s[i:]


def _strip_thousands(s: str) -> str:
    """'1,234,567' -> '1234567', but only when every comma of s sits in such a number: in
    '45,135^\\circ' or '1,500,2' the commas separate a list."""
    numbers = _THOUSANDS.findall(s)
    if not numbers or s.count(",") != sum(n.count(",") for n in numbers):
        return s
    return _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s)


def _strip_units(s: str) -> str:
    """'18 dollars' -> '18', '1000.99m²' -> '1000.99': up to three trailing unit words, and only
    when a number remains ('5 or more', '2x' stay as they are)."""
    rest = s
    for _ in range(3):
        m = _LAST_WORD.search(rest)
        if not m or m.group(1).lower() not in _UNITS:
            break
        rest = rest[:m.start()].rstrip()
    return rest if rest != s and _to_number(rest) is not None else s


def _normalize(s: str) -> str:
    """Strip what does not change a final answer's value: outer braces, $, LaTeX spacing and
    text wrappers, \\left/\\right, degrees, percent, thousands separators, a trailing unit."""
    s = _strip_outer_braces(s.strip().replace("\u2212", "-"))  # Unicode minus
    s = re.sub(r",\s*\\!\s*", ",", s).replace("{,}", ",").replace("\\!", "").replace("\\$", "").replace("$", "")
    s = _SPACING.sub(lambda m: m.group() if m.group() == "\\\\" else " ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = _unwrap(_strip_thousands(s))  # '2, 500' stays a list; 5\text{ cm} -> '5 cm', whose unit goes below
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree|\\%|%|\bpercent\b|\bpct\b", "", s)
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s.strip())  # x = 5 -> 5
    s = s.strip().rstrip(".").strip()
    if s.startswith("(") and s.endswith(")") and "," not in s:  # (1/3) -> 1/3, but not a point (1, 2)
        s = s[1:-1].strip()
    return _strip_units(s)


def _to_number(s: str) -> int | float | None:
    """An integer as an int (compared exactly); a decimal, a/b, \\frac{a}{b} (\\frac13 too) or a
    mixed number 3\\frac{1}{2} as a float; signed. None if s is none of them or is huge."""
    sign, s = (-1, s[1:].lstrip()) if s.startswith("-") else (1, s.removeprefix("+"))
    try:
        if re.fullmatch(r"\d+", s):
            value = int(s)
        elif re.fullmatch(_NUM, s):
            value = float(s)
        elif m := _RATIO.fullmatch(s):
            value = float(m.group(1)) / float(m.group(2))
        elif m := _FRAC.fullmatch(s):
            value = int(m.group(1) or 0) + float(m.group(2) or m.group(3)) / float(m.group(4) or m.group(5))
        else:
            return None
    except (ValueError, ZeroDivisionError):  # a zero denominator, or an int of over 4,300 digits
        return None
    return sign * value if abs(value) < 1e300 else None  # a huge int compares as a string: exactly


def verify(completion: str, gold: str) -> float:
    """1.0 iff the completion's final answer equals `gold` mathematically: integers exactly,
    decimals and fractions to a 1e-6 relative tolerance, else as normalised strings
    (case-insensitive). A gold that is one capital letter A-J is a multiple-choice option: the
    answer must name that option alone. Never raises."""
    answer = extract_answer(completion)
    if not isinstance(gold, str):
        gold = str(gold)
    if re.fullmatch(r"[A-J]", gold.strip()):  # multiple choice (MMLU-STEM): one letter, as B, (B), B) 42
        if answer is None and isinstance(completion, str):
            answer = (re.findall(r"ANSWER:\s*(.*)", completion) or [None])[-1]  # evalscope's 'ANSWER: B' line
        m = re.fullmatch(r"\(?([A-J])[).:]?(?:\s+(.*))?", _unwrap(answer or "").strip())
        return float(bool(m) and m.group(1) == gold.strip()  # and no other choice in the option's text
                     and not re.search(r"(?<![A-Za-z])[A-J](?![A-Za-z])", m.group(2) or ""))
    if "####" in gold or _BOXED.search(gold):  # a whole GSM8K / MATH solution was passed as gold
        gold = extract_answer(gold) or ""
    if not answer or not gold.strip():
        return 0.0
    a, g = _normalize(answer), _normalize(gold)
    if a.replace(" ", "").lower() == g.replace(" ", "").lower():
        return 1.0
    x, y = _to_number(a), _to_number(g)
    if x is None or y is None:
        return 0.0
    if isinstance(x, int) and isinstance(y, int):
        return float(x == y)
    return float(abs(x - y) <= 1e-6 * max(abs(x), abs(y)))


def toy_problem(a: int, b: int) -> dict:
    """'47+38=' with a worked chain of thought, right to left with carries:
    '7+8+0=15,4+3+1=8 #### 85'."""
    x, y, carry, steps = str(a)[::-1], str(b)[::-1], 0, []
    for i in range(max(len(x), len(y))):
        dx, dy = int(x[i]) if i < len(x) else 0, int(y[i]) if i < len(y) else 0
        steps.append(f"{dx}+{dy}+{carry}={dx + dy + carry}")
        carry = (dx + dy + carry) // 10
    return {"question": f"{a}+{b}=", "answer": str(a + b), "solution": f"{','.join(steps)} #### {a + b}"}


def make_toy_task(digits: int, n_test: int, seed: int, n_max: int = 20_000) -> tuple[list, list]:
    """Seeded, disjoint train/test splits of `digits`-digit additions."""
    lo, hi = 10 ** (digits - 1), 10 ** digits
    width = hi - lo
    picks = random.Random(seed).sample(range(width * width), min(width * width, n_max))
    rows = [toy_problem(lo + i // width, lo + i % width) for i in picks]
    return rows[n_test:], rows[:n_test]


def _text(x) -> str:
    """A cell as the text written in it; a missing one (JSON null, an empty cell) as ''."""
    return "" if x is None else str(x)


def _question_answer_row(r: dict) -> dict:
    """A local file's row, or GSM8K's: an answer that is a worked solution ending in '#### 72'
    keeps both parts."""
    question, answer = _text(r["question"]), _text(r["answer"])
    if "####" in answer:
        return {"question": question, "answer": extract_answer(answer) or "", "solution": answer}
    return {"question": question, "answer": answer}


def _problem_row(r: dict) -> dict:
    return {"question": _text(r["problem"]), "answer": _text(r["answer"])}


def _mmlu_row(r: dict) -> dict | None:
    """Multiple choice: the options listed as 'A) ...' under the question; the gold is the letter."""
    if r.get("subject") == "anatomy":  # evalscope's MMLU-STEM is 18 subjects; TIGER-Lab's adds anatomy
        return None
    options = "\n".join(f"{letter}) {choice}" for letter, choice in zip(string.ascii_uppercase, r["choices"]))
    return {"question": f"{r['question']}\n\n{options}\n\nAnswer with the letter of the correct option.",
            "answer": string.ascii_uppercase[int(r["answer"])]}


def _openr1_row(r: dict) -> dict | None:
    """OpenR1-Math-220k keeps NuminaMath-1.5's placeholders for problems without a checkable final
    answer ('proof', 'notfound'); those, and answers the verifier cannot match with themselves, go."""
    answer = _text(r["answer"]).strip()
    if r.get("question_type") == "proof" or answer.lower() in ("", "proof", "notfound") or \
            verify(f"\\boxed{{{answer}}}", answer) < 1:
        return None
    return {"question": _text(r["problem"]), "answer": answer}


# The hub datasets: id, config, split, the columns used, and how a row becomes {question, answer[,
# solution]} (None: left out). Ids, splits and columns are those of the dataset cards in the README.
DATASETS = {
    "gsm8k": ("openai/gsm8k", "main", "test", "question answer", _question_answer_row),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem answer", _problem_row),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "problem answer", _problem_row),  # 30, its only split
    "minerva": ("knoveleng/Minerva-Math", None, "train", "problem solution",  # the solution's last \boxed{}
                lambda r: {"question": _text(r["problem"]), "answer": extract_answer(_text(r["solution"])) or ""}),
    "mmlu-stem": ("TIGER-Lab/MMLU-STEM", None, "test", "question choices answer", _mmlu_row),
    "openr1": ("open-r1/OpenR1-Math-220k", "default", "train", "problem answer", _openr1_row),
}


def read_dataset(spec: str, split: str | None = None) -> list[dict]:
    """Rows {question, answer[, solution]} of `spec`: a name of DATASETS (from the hub, or NAME=PATH
    from a local file in that dataset's own schema), or a local .jsonl/.json/.parquet/.csv file with
    question and answer columns. Duplicate questions and rows without an answer are left out."""
    try:
        import datasets  # imported here so that the toy run works without it
    except ImportError:
        raise UserError(f"{spec} needs the `datasets` package: pip install -r requirements.txt") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become our one-line message
    name, _, path = spec.strip().partition("=")
    if name in DATASETS:
        hub_id, config, hub_split, columns, to_row = DATASETS[name]
    elif path:
        raise UserError(f"{spec}: unknown dataset {name!r}; NAME=PATH takes one of {', '.join(DATASETS)}")
    else:
        hub_id, config, hub_split, columns, to_row, path = None, None, None, "question answer", _question_answer_row, name
    if path:
        builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
        ext = os.path.splitext(path)[1].lower()
        if ext not in builders:
            raise UserError(f"{spec!r} is not a dataset name ({', '.join(DATASETS)}) nor a "
                            ".jsonl/.json/.parquet/.csv file")
        if not os.path.isfile(path):
            raise UserError(f"dataset file {path} does not exist")
        text = {"converters": {c: str for c in columns.split()}, "keep_default_na": False} if ext == ".csv" else {}
        try:  # a CSV's cells are read as the text written in them: '4' stays '4', an empty cell is ''
            table = datasets.load_dataset(builders[ext], data_files=path, split="train", **text)
        except Exception as e:
            reason = str(e.__cause__ or e).strip().splitlines()[0][:200]
            raise UserError(f"could not read {path} as {ext[1:]}: {reason}") from None
    else:
        print(f"loading {hub_id} ({split or hub_split}) from the hub or its local cache ...")
        try:
            table = datasets.load_dataset(hub_id, config, split=split or hub_split)
        except Exception as e:
            raise UserError(f"could not load {hub_id} from the hub ({type(e).__name__}); with no network, pass "
                            f"a local copy as {name}=FILE (its schema) or a file with question, answer "
                            "columns") from None
    missing = [c for c in columns.split() if c not in table.column_names]
    if missing:
        raise UserError(f"{path or hub_id} has columns {table.column_names}; {name if path != name else 'a file'} "
                        f"needs {' and '.join(repr(c) for c in columns.split())} (missing: {', '.join(missing)})")
    rows = {}
    for row in map(to_row, table):
        if row and row["question"] and row["answer"]:
            rows.setdefault(row["question"], row)  # the first of duplicate questions
    return list(rows.values())


def load_rows(cfg: Config) -> tuple[list, list]:
    """(train, held-out) rows for --dataset: GSM8K's own train and test splits; otherwise the rows
    shuffled with --seed and --eval-size of them held out (MATH-500 has only 500 test problems)."""
    if cfg.dataset == "toy":
        return make_toy_task(cfg.toy_digits, cfg.eval_size, cfg.seed)
    if cfg.dataset == "gsm8k":
        return read_dataset("gsm8k", "train"), read_dataset("gsm8k", "test")[:cfg.eval_size]
    rows = read_dataset(cfg.dataset)
    if len(rows) <= cfg.eval_size:
        raise UserError(f"{cfg.dataset} has {len(rows)} rows; --eval-size {cfg.eval_size} would leave none "
                        "to train on (lower --eval-size)")
    random.Random(cfg.seed).shuffle(rows)
    return rows[cfg.eval_size:], rows[:cfg.eval_size]


def build_prompt(tokenizer, question: str, dataset: str, thinking: bool = False) -> list[int]:
    """Chat template when the tokenizer has one (`thinking` is Qwen3's enable_thinking; other
    templates ignore it); the toy task's own format ('47+38=') for a model without one; else a
    plain prompt asking for \\boxed{}. (No warning for a prompt longer than the context: train()
    stops with its own message.)"""
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": f"{question}\n{instruction}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=thinking)
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if dataset == "toy":
        return tokenizer(question, verbose=False)["input_ids"]
    return tokenizer(f"Question: {question}\n{instruction}\nAnswer:", verbose=False)["input_ids"]


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the chat template (Qwen's <|im_end|>,
    Llama 3's <|eot_id|>), read off a rendered turn. Base models often have another eos
    (Qwen2.5: <|endoftext|>); without this stop token they write on into invented turns."""
    marker = "EGPO-END-OF-ANSWER"
    turn = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # a template that cannot render a finished turn: no extra stop token
        return None
    after = tokenizer(text.split(marker)[-1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None


# ====================================================================================
# 3. Model: the tiny offline one (built here, random init), or any causal LM.
# ====================================================================================
TINY_VOCAB = ["<pad>", "<eos>", "<unk>"] + [c for c in string.printable if c not in "\t\r\x0b\x0c"]
TINY_CONFIG = dict(vocab_size=len(TINY_VOCAB), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)


def build_tiny_model(seed: int):
    """A 0.14M-parameter Qwen2ForCausalLM (random init) and a character-level tokenizer, built
    locally: hidden 64, intermediate 256, 2 layers, 4 heads, tied embeddings, context 256."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {tok: i for i, tok in enumerate(TINY_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", model_max_length=256)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY_CONFIG, bos_token_id=None)), tokenizer


def load_policy(cfg: Config, device: torch.device, path: str | None = None):
    """(Policy(model), tokenizer) of --model (or of the directory `path`) on `device`, weights in
    fp32, left padding, and a generation config that holds only token ids (eos, and the chat
    template's end of turn), so sampling is exactly temperature + top-p and stops where the
    model's answer ends."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if cfg.model == "tiny" and path is None:
        model, tokenizer = build_tiny_model(cfg.seed)
    else:
        name = path or ALIASES.get(cfg.model, cfg.model)
        if not os.path.isdir(name):
            print(f"loading {name} from the hub or its local cache ...")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        except (OSError, ValueError) as e:
            where = "is not a local directory and could not be fetched from the hub"
            raise UserError(f"model {cfg.model!r} {where} ({type(e).__name__}): pass a local path saved with "
                            "save_pretrained, check the hub id and the network, or run `python egpo.py` for the "
                            "offline demo") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    end_of_turn = end_of_turn_id(tokenizer) if tokenizer.chat_template else None
    eos_ids = sorted({tokenizer.eos_token_id, end_of_turn, *(eos if isinstance(eos, list) else [eos])} - {None})
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=model.generation_config.bos_token_id)
    if cfg.gradient_checkpointing:  # transformers < 5.24 names it gradient_checkpointing_enable
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return Policy(model).to(device), tokenizer


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA over fp32 weights (as TRL's bf16=True): a 1e-6 update is below
    bf16's resolution, so the weights themselves stay fp32. --bf16 is off by default for the tiny
    model, whose warm-up lost accuracy under bf16 in an earlier check (README, "On a GPU")."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def context_length(model, tokenizer) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    return n or min(tokenizer.model_max_length, 10 ** 7)  # some tokenizers say 1e30 for "unknown"


# ====================================================================================
# 4. Sampling and token log-probs
# ====================================================================================
LOGIT_CHUNK = 1024  # positions whose fp32 logits exist at once: 1024 x 151,936 vocab x 4 B = 0.6 GB


class Policy(torch.nn.Module):
    """The causal LM `lm` behind the one forward that DDP and FSDP wrap (their hooks run on a
    module's forward). It runs the LM's body, then its output layer in fp32 (also under bf16
    autocast: bf16 logits put up to 0.06 nats of error into each log-prob) on the positions
    that are needed only, never on the whole (N, L, vocab):
    - targets (N, T) given: log pi(target) at the last T positions (flat), from logits / T computed
      LOGIT_CHUNK positions at a time; under autograd each chunk's logits are recomputed in
      the backward pass instead of kept (token_logprobs, the update);
    - else: the last position's logits / T and the KV cache to continue from (the sampler).
    The output layer must be a plain linear map, as in Qwen, Llama, Mistral and most LMs."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, temperature: float, targets=None, cache=None):
        if targets is None and cache is None:
            cache = kv_cache(self.lm.config)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=cache, use_cache=targets is None)
        hidden, head = out.last_hidden_state, self.lm.get_output_embeddings().weight     # (N, L, d), (V, d)
        if targets is None:
            return fp32_logits(hidden[:, -1], head, temperature), out.cache               # (N, V)
        hidden = hidden[:, -targets.shape[1] - 1:-1].flatten(0, 1)                       # (N*T, d)
        flat, parts = targets.flatten(), []
        for i in range(0, len(flat), LOGIT_CHUNK):
            chunk = (hidden[i:i + LOGIT_CHUNK], head, flat[i:i + LOGIT_CHUNK], temperature)
            recompute = torch.is_grad_enabled() and len(flat) > LOGIT_CHUNK  # one chunk: nothing to save
            parts.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, *chunk, use_reentrant=False)
                         if recompute else chunk_logprobs(*chunk))
        return torch.cat(parts)  # (N*T,), flat: a view as the output would trip FSDP's backward hook


def kv_cache(config):
    """transformers' DynamicCache, but the keys are stored in the values' dtype: under bf16 autocast
    the rotary embedding makes the keys fp32 (the values stay bf16), a cache 1.5x as large.
    Attention casts them to bf16 all the same, so no number changes."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    update = cache.update
    cache.update = lambda keys, values, *args, **kwargs: update(keys.to(values.dtype), values, *args, **kwargs)
    return cache


def fp32_logits(hidden, head, temperature: float):
    with torch.autocast(hidden.device.type, enabled=False):
        return (hidden.float() / temperature) @ head.float().T                           # (n, V)


def chunk_logprobs(hidden, head, targets, temperature: float):
    logits = fp32_logits(hidden, head, temperature)                                      # (n, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)        # (n,)


def token_logprobs(policy, input_ids, attention_mask, n_response: int, temperature: float, bf16: bool = False):
    """log pi(o_t | q, o_<t) of the last `n_response` tokens, from raw logits / T (never from
    top-p-filtered ones): the update's forward, and the sampler's numbers recomputed."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # as generate() does for left padding
    with autocast(input_ids.device, bf16):
        targets = input_ids[:, -n_response:]
        return policy(input_ids, attention_mask, position_ids, temperature, targets=targets).view(targets.shape)


def pick(probs: torch.Tensor, u: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Inverse-CDF sampling: for each row, the first token at which the cumulative probability
    passes u * (the kept mass), u uniform in [0, 1). top_k > 0 keeps the k likeliest tokens, then
    top_p < 1 the likeliest ones whose mass before them is < top_p (transformers' order and rule)."""
    order = None
    if top_k > 0 or top_p < 1:  # the k (or all) likeliest tokens, in decreasing order
        k = min(top_k, probs.shape[-1]) if top_k > 0 else probs.shape[-1]
        probs, order = probs.topk(k, -1)                                                 # (N, k)
        before = probs.cumsum(-1) - probs
        probs = torch.where(before < top_p * probs.sum(-1, keepdim=True), probs, 0.0)
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=probs.shape[-1] - 1)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)             # (N,)


@torch.no_grad()
def sample(policy, input_ids, attention_mask, stop_ids: list[int], pad_id: int, max_new_tokens: int, *,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, noise=None, bf16: bool = False):
    """The sampler of Algorithm 1: one forward over the left-padded prompts (prefill), then one
    token per forward, reusing the keys and values of the earlier positions (KV cache).
    noise None: greedy. Else noise[:, t] (uniforms in [0, 1)) picks token t by `pick` from
    softmax(logits / T): a row's sample depends on its own noise only, so one process or N
    sample the same. A row stops after its first token in `stop_ids` (pad_id after it); the
    loop ends when every row has stopped. Returns, each (N, T):
    - response: the sampled tokens;
    - logprobs: log pi(o_t) under softmax(logits / T), the numbers token_logprobs recomputes
      (the paper: the log-probs "are already computed during rollout generation");
    - token_entropy: the full distribution's entropy -sum_v p_v log p_v (EDGE-GRPO)."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    stop = torch.tensor(stop_ids, device=input_ids.device)
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    x, cache, tokens, logprobs, entropies = input_ids, None, [], [], []
    for t in range(max_new_tokens):
        with autocast(input_ids.device, bf16):
            logits, cache = policy(x, attention_mask, position_ids, temperature, cache=cache)   # (N, V)
        log_p = logits.log_softmax(-1)
        p = log_p.exp()
        token = logits.argmax(-1) if noise is None else pick(p, noise[:, t], top_p, top_k)
        token = token.masked_fill(done, pad_id)                                          # (N,)
        tokens.append(token)
        logprobs.append(log_p.gather(-1, token[:, None]).squeeze(-1))
        entropies.append(-(p * log_p).sum(-1))
        done |= torch.isin(token, stop)
        if done.all():
            break
        x, position_ids = token[:, None], position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, torch.ones_like(x)], 1)
    return torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(entropies, 1)


@torch.no_grad()
def rollout(policy, tokenizer, prompts: list[list[int]], golds: list[str], n: int, cfg: Config,
            greedy: bool = False, noise=None) -> dict:
    """Generate `n` responses per prompt and verify them. Rows k*n .. k*n+n-1 belong to
    prompt k. `noise` (P*n, --max-new-tokens) drives the sampling (drawn here if not given).
    Returns input_ids (prompt + response), attention_mask, response_mask (response tokens up
    to and including the stop token), entropy_mask (Eq. 5's span S_i), truncated (no stop
    token within --max-new-tokens), the sampler's logprobs and token_entropy, rewards, texts,
    prompts (text)."""
    device = next(policy.parameters()).device
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(device)
    ids, attn = batch["input_ids"].repeat_interleave(n, 0), batch["attention_mask"].repeat_interleave(n, 0)
    if not greedy and noise is None:
        noise = torch.rand(len(ids), cfg.max_new_tokens)
    policy = unwrap(policy).eval()  # under FSDP, call it inside full_weights(): one gather for many rollouts
    stop_ids = policy.lm.generation_config.eos_token_id
    response, logprobs, token_entropy = sample(
        policy, ids, attn, stop_ids, tokenizer.pad_token_id, cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, noise=None if greedy else noise.to(device), bf16=cfg.bf16)  # (P*n, T) x 3
    response_mask = eos_mask(response, stop_ids)                                                # (P*n, T)
    entropy_mask = response_mask
    if cfg.entropy_span == "answer":
        think_end = tokenizer("</think>", add_special_tokens=False)["input_ids"]
        entropy_mask = answer_mask(response, response_mask, think_end)
    texts = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(response, response_mask)]
    golds = [g for g in golds for _ in range(n)]
    rewards = torch.tensor([verify(t, g) for t, g in zip(texts, golds)], device=device)
    truncated = ~torch.isin(response, torch.tensor(stop_ids, device=device)).any(1)          # (P*n,)
    return {"input_ids": torch.cat([ids, response], 1),
            "attention_mask": torch.cat([attn, torch.ones_like(response)], 1),
            "response_mask": response_mask, "entropy_mask": entropy_mask, "truncated": truncated,
            "logprobs": logprobs, "token_entropy": token_entropy, "rewards": rewards, "texts": texts,
            "prompts": [p for p in tokenizer.batch_decode(prompts, skip_special_tokens=True) for _ in range(n)]}


def eos_mask(response: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True for every response token up to and including the first EOS (the EOS is trained
    on: it is the model's decision to stop); False for the padding generate() adds after it.
    A truncated response (no EOS) is kept whole."""
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device)).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def cat_rollouts(parts: list[dict], keep: list[torch.Tensor], pad_id: int) -> dict:
    """The rows keep[k] (a bool per row) of each rollout parts[k], stacked into one: prompts stay
    left-padded and responses right-padded to the widest. DAPO's dynamic sampling uses it."""
    n_resp = [part["response_mask"].shape[1] for part in parts]
    n_prompt = [part["input_ids"].shape[1] - t for part, t in zip(parts, n_resp)]
    P, T = max(n_prompt), max(n_resp)

    def stack(key, value):
        rows = []
        for part, k, p, t in zip(parts, keep, n_prompt, n_resp):
            x = part[key][k]
            left = P - p if x.shape[1] > t else 0  # input_ids and attention_mask hold the prompt too
            x = x if x.is_floating_point() else x.long()  # pad() takes no bool
            rows.append(torch.nn.functional.pad(x, (left, T - t), value=value).to(part[key].dtype))
        return torch.cat(rows)

    out = {key: stack(key, value) for key, value in
           [("input_ids", pad_id), ("attention_mask", 0), ("response_mask", 0), ("entropy_mask", 0),
            ("logprobs", 0.0), ("token_entropy", 0.0)]}
    for key in ("rewards", "truncated"):
        out[key] = torch.cat([part[key][k] for part, k in zip(parts, keep)])
    for key in ("texts", "prompts"):
        out[key] = [x for part, k in zip(parts, keep) for x, kept in zip(part[key], k.tolist()) if kept]
    return out


# ====================================================================================
# 5. Entropy proxy (paper Eq. 5) -- ALGO LOGIC
# ====================================================================================
def sequence_entropy(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 5: H_i = -(1/|S_i|) sum_{t in S_i} log pi_old(o_t | q, o_<t), the mean negative
    log-likelihood of the sampled path, a Monte-Carlo estimate of the policy's per-token entropy
    along it. Zero overhead: it reuses the log-probs the sampler computed (`sample`). `mask`
    marks S_i (the response, or its answer span). Detached; NaN for a response with no token
    in S_i (it then takes no part in its group's calibration)."""
    mask = mask.to(logprobs.dtype)
    n = mask.sum(-1)                                                                     # (N,)
    h = -(logprobs.detach() * mask).sum(-1) / n.clamp(min=1)
    return torch.where(n > 0, h, float("nan"))                                           # (N,)


def answer_mask(response: torch.Tensor, mask: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """--entropy-span answer (paper RQ4, "Answer Entropy"): the response tokens after the last
    `marker` (the token ids of '</think>'); the whole response where there is none."""
    k = len(marker)
    if k == 0 or response.shape[1] < k:
        return mask
    windows = response.unfold(1, k, 1)                                                   # (N, T-k+1, k)
    hits = (windows == torch.tensor(marker, device=response.device)).all(-1) & mask[:, k - 1:]
    position = torch.arange(hits.shape[1], device=response.device)
    last = torch.where(hits, position, -1).amax(1, keepdim=True)                         # (N, 1), -1: none
    after = torch.arange(response.shape[1], device=response.device) >= last + k          # (N, T)
    return mask & torch.where(last >= 0, after, True)


# ====================================================================================
# 6. Advantages: GRPO (paper Eq. 2) and the EGPO calibration (Eqs. 7-11, 13) -- ALGO LOGIC
# ====================================================================================
def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 2: A_i = (r_i - mean_j r_j) / (std_j r_j + eps), unbiased std over each group of
    `group_size` consecutive rows (as TRL and verl). Uniform groups give A = 0."""
    r = rewards.float().view(-1, group_size)                                             # (B, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def confidence_ratio(entropy: torch.Tensor, group_size: int, eps_h: float = 1e-5) -> torch.Tensor:
    """Eq. 7: w^_i = Hbar / (H_i + eps_H), Hbar the mean entropy proxy of the group's valid
    responses. w^_i > 1: more confident than the group. A response without entropy (NaN)
    is left out of Hbar and gets w^ = 1 (as in the authors' code)."""
    h = entropy.float().view(-1, group_size)                                             # (B, G)
    w = h.nanmean(1, keepdim=True) / (h + eps_h)
    return torch.where(h.isnan(), 1.0, w).view(-1)


def egpo_advantages(rewards: torch.Tensor, entropy: torch.Tensor, group_size: int, *,
                    calibration: str = "asymmetric", lambda_min: float = 0.8, lambda_max: float = 2.0,
                    nsr: str = "entropy", renorm: str = "none", eps: float = 1e-6,
                    eps_h: float = 1e-5) -> torch.Tensor:
    """EGPO's calibrated advantages A~ (paper Section 3, Algorithm 1), per group of
    `group_size` consecutive rows:

    - Eq. 7: w^ = Hbar / (H + eps_h)                                   (confidence_ratio)
    - Eq. 8: c = clip(w^, lambda_min, lambda_max); w = max(1, c) if correct, min(1, c) if wrong:
      a correct answer is never down-weighted, a failure never penalised more than by GRPO.
      Ablations of Table 2: symmetric (C1) w = c; neg-only (C2) correct w = c;
      pos-only (C3) wrong w = c.
    - Eq. 9 (optional): w <- w / mean_group(w), after the clamp (C5) or on w^ before it (C6).
    - Eq. 10: base advantage A = 0 in an all-correct group, GRPO's Eq. 2 in a mixed one, -1 in
      an all-wrong one (negative-sample reinforcement, NSR, Eq. 13; nsr="off": 0 as in GRPO).
    - Eq. 11: A~ = w * A. In an all-wrong group A~ = -w, in [-1, -lambda_min]: confident
      failures are pushed down fully, uncertain ones more gently (nsr="flat", C4: w = 1).

    Worked example, G = 4, rewards (1, 1, 0, 0), entropies (0.5, 2, 0.5, 2): Hbar = 1.25,
    w^ = (2.5, 0.625, 2.5, 0.625), A = (0.866, 0.866, -0.866, -0.866), w = (2, 1, 1, 0.8),
    A~ = (1.732, 0.866, -0.866, -0.693). All wrong, entropies (0.2, 0.5, 1.0, 2.3):
    w^ = (5, 2, 1, 0.43), A~ = (-1, -1, -1, -0.8).
    """
    if calibration not in ("asymmetric", "symmetric", "neg-only", "pos-only") or \
            nsr not in ("entropy", "flat", "off") or renorm not in ("none", "after-clamp", "before-clamp"):
        raise ValueError(f"unknown calibration={calibration!r}, nsr={nsr!r} or renorm={renorm!r}")
    r = rewards.float().view(-1, group_size)                                             # (B, G)
    w_hat = confidence_ratio(entropy, group_size, eps_h).view(-1, group_size)            # Eq. 7
    if renorm == "before-clamp":                                                         # Eq. 9 (C6)
        w_hat = w_hat / w_hat.mean(1, keepdim=True)
    c = w_hat.clamp(lambda_min, lambda_max)                                              # Eq. 8
    w_correct = c.clamp(min=1.0) if calibration in ("asymmetric", "pos-only") else c        # never weakened
    w_wrong = c.clamp(max=1.0) if calibration in ("asymmetric", "neg-only") else c           # never strengthened
    w = torch.where(r > 0, w_correct, w_wrong)
    if renorm == "after-clamp":                                                          # Eq. 9 (C5)
        w = w / w.mean(1, keepdim=True)
    all_wrong = r.amax(1, keepdim=True) <= 0                                             # (B, 1)
    if nsr == "flat":                                                                    # C4
        w = torch.where(all_wrong, 1.0, w)
    nsr_base = -1.0 if nsr in ("entropy", "flat") else 0.0                               # Eq. 13
    base = torch.where(all_wrong, nsr_base, grpo_advantages(rewards, group_size, eps).view(-1, group_size))
    return (w * base).view(-1)                                                           # Eqs. 10, 11


# ====================================================================================
# 7. Policy loss (paper Eq. 12): PPO-clip surrogate + optional k3 KL -- ALGO LOGIC
# ====================================================================================
def masked_mean(x: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """token-mean: over all unmasked tokens of the batch; seq-mean-token-mean: over each
    response's tokens, then over responses."""
    if loss_agg == "token-mean":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    raise ValueError(f"loss_agg must be token-mean or seq-mean-token-mean, not {loss_agg!r}")


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps_low=0.2, clip_eps_high=0.2,
                ref_logprobs=None, beta=0.0, loss_agg="token-mean"):
    """Eq. 12, per token: ratio = exp(logp - logp_old);
    pg = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), plus beta * KL_k3 with
    KL_k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman, "Approximating KL divergence",
    2020). Returns (loss, stats) with stats = {kl, clip_frac} (fractions of masked tokens)."""
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)                                           # (N, T)
    adv = advantages.unsqueeze(-1)                                                       # (N, 1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv
    per_token = -torch.min(unclipped, clipped)                                           # (N, T)
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1                                                # k3, >= 0
    if beta > 0:
        per_token = per_token + beta * kl
    loss = masked_mean(per_token, mask, loss_agg)
    clip_active = (clipped < unclipped).to(mask.dtype)  # exactly where the clipped branch has no gradient
    stats = {"kl": masked_mean(kl.detach(), mask).item(), "clip_frac": masked_mean(clip_active, mask).item()}
    return loss, stats


# ====================================================================================
# 8. Metrics of one step (EGPO_SPEC section 7)
# ====================================================================================
def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted 1/2;
    NaN when one class is absent (Mann-Whitney U)."""
    pos = labels > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = scores.double().unique(return_inverse=True, return_counts=True)
    rank = (counts.cumsum(0) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties given their mean rank
    return ((rank[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def calibration_metrics(rewards, entropy, adv, adv_hat, group_size: int) -> dict:
    """Accuracy, entropy proxy by correctness, weights w = A~ / A in mixed groups, NSR's mean A~
    in all-wrong groups, group kinds, the four metacognitive quadrants (confident = H below its
    group's mean), AUROC. Responses without entropy (NaN) are left out of the entropy numbers."""
    r, h = rewards.float().view(-1, group_size), entropy.float().view(-1, group_size)
    nan = float("nan")
    mixed, all_wrong = r.std(1) > 0, r.amax(1) <= 0
    confident = (h < h.nanmean(1, keepdim=True)).view(-1)
    correct = rewards.view(-1) > 0
    in_mixed = mixed.repeat_interleave(group_size) & (adv != 0)
    w = adv_hat[in_mixed] / adv[in_mixed]
    nsr = adv_hat[all_wrong.repeat_interleave(group_size)]
    valid = ~entropy.isnan()
    return {
        "reward_mean": rewards.float().mean().item(),
        "acc": correct.float().mean().item(),
        "entropy_mean": entropy.nanmean().item(),
        "entropy_correct": entropy[correct].nanmean().item() if correct.any() else nan,
        "entropy_incorrect": entropy[~correct].nanmean().item() if (~correct).any() else nan,
        "weight_mean": w.mean().item() if len(w) else nan,
        "weight_min": w.min().item() if len(w) else nan,
        "weight_max": w.max().item() if len(w) else nan,
        "nsr_adv_mean": nsr.mean().item() if len(nsr) else nan,
        "groups_all_correct": int((r.amin(1) > 0).sum()),
        "groups_all_wrong": int(all_wrong.sum()),
        "groups_mixed": int(mixed.sum()),
        "confident_correct": int((confident & correct).sum()),
        "fragile_correct": int((~confident & correct & valid).sum()),
        "overconfident_wrong": int((confident & ~correct).sum()),
        "exploratory_wrong": int((~confident & ~correct & valid).sum()),
        "auroc_confidence": auroc(-entropy[valid], rewards[valid]),
    }


# ====================================================================================
# 9. More than one process (torchrun): data parallel (DDP) or sharded (FSDP2)
# ====================================================================================
def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without torchrun."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_sum(x, device) -> torch.Tensor:
    """x summed over the processes (x itself with one), as a float64 tensor."""
    x = torch.as_tensor(x, dtype=torch.float64, device=device)
    if world()[1] > 1:
        torch.distributed.all_reduce(x)
    return x


def all_max(x: int, device) -> int:
    """The largest x over the processes. Under torchrun the widest process's sequence length sets
    everyone's micro-batches, so that every process runs as many forwards (FSDP's collectives
    need it)."""
    x = torch.tensor(x, device=device)
    if world()[1] > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return int(x)


def all_gather_objects(rows: list) -> list:
    """The lists of all processes, concatenated, rank 0's first: the rows and order of one process
    running the whole batch."""
    if world()[1] == 1:
        return rows
    parts = [None] * world()[1]
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def all_gather(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor concatenated over the processes, rank 0's rows first."""
    if world()[1] == 1:
        return list(tensors)
    parts = all_gather_objects([[x.cpu() for x in tensors]])
    return [torch.cat(xs).to(x.device) for xs, x in zip(zip(*parts), tensors)]


def init_distributed(cfg: Config) -> torch.device:
    """Under torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK): join the process group, one GPU
    per process (NCCL) or CPU processes (gloo). Alone: cfg.device."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        if cfg.fsdp:
            raise UserError("--fsdp shards the model over several processes: run it with "
                            "torchrun --nproc_per_node N egpo.py --fsdp ..., N >= 2")
        return torch.device(cfg.device)
    if cfg.prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the {world_size} "
                        "processes: each takes whole groups")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def parallelize(policy: Policy, cfg: Config):
    """Under torchrun: rank 0's weights on every process, then DDP (a full copy per process,
    gradients averaged by all-reduce) or, with --fsdp, FSDP2's fully_shard (parameters, gradients
    and optimizer state split across the processes, each decoder layer gathered only while it runs)."""
    if world()[1] == 1:
        return policy
    for x in policy.state_dict().values():
        torch.distributed.broadcast(x, 0)
    device = next(policy.parameters()).device
    if not cfg.fsdp:
        return torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for module in policy.modules():
        if type(module).__name__ in (policy.lm._no_split_modules or []):  # the decoder layers
            fully_shard(module)
    return fully_shard(policy)


@contextlib.contextmanager
def gradient_sync(policy, sync: bool):
    """Gradient accumulation without communication: under DDP (no_sync around the forward and the
    backward, or the reducer is armed already) and FSDP (no reduce-scatter), only a micro-batch
    with sync=True reduces the gradients across the processes."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(policy, FSDPModule):
        policy.set_requires_gradient_sync(sync)
    with policy.no_sync() if isinstance(policy, torch.nn.parallel.DistributedDataParallel) and not sync else \
            contextlib.nullcontext():
        yield


def unwrap(policy) -> Policy:
    return policy.module if isinstance(policy, torch.nn.parallel.DistributedDataParallel) else policy


@contextlib.contextmanager
def full_weights(policy):
    """The module to sample with. DDP: the module inside (its own forward would sync buffers at
    every token). FSDP: the policy with all its weights gathered once for the whole generation,
    so that no decode step waits for the other processes (they stop at different lengths)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(policy, FSDPModule):
        yield unwrap(policy)
        return
    sharded = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    policy.set_reshard_after_forward(False)
    for m in sharded:
        m.unshard()
    try:
        yield policy
    finally:
        for m in sharded:
            m.reshard()
        policy.set_reshard_after_forward(True)
        policy.set_reshard_after_forward(False, recurse=False)  # FSDP2's default for the root


def barrier():
    if world()[1] > 1:
        torch.distributed.barrier()


def generator_states(rng: random.Random, noise_rng: torch.Generator, device) -> dict:
    """Every random generator a run draws from: the prompts (Python's), the sampling noise and torch's."""
    return {"python": rng.getstate(), "noise": noise_rng.get_state(), "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def save_checkpoint(policy, tokenizer, optimizer, generators: dict, summary: dict, cfg: Config):
    """checkpoint/: the model and tokenizer (save_pretrained), the AdamW state (optimizer.pt; under
    FSDP each process's shard, optimizer-rank<r>.pt), each process's random generators (rng.pt),
    and trainer_state.json (the step and the summary so far), written last: a checkpoint is
    complete when it holds that file. All goes to checkpoint.new/, which then replaces
    checkpoint/, so a kill at any moment leaves the previous checkpoint whole. Rank 0 writes the
    shared files; all processes call this (FSDP gathers the weights to rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    rank, world_size = world()
    final, new, old = (os.path.join(cfg.out, name) for name in ("checkpoint", "checkpoint.new", "checkpoint.old"))
    weights = None
    if isinstance(policy, FSDPModule):
        weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        weights = {k.removeprefix("lm."): v for k, v in weights.items()}
    generators = all_gather_objects([generators])
    if rank == 0:
        shutil.rmtree(new, ignore_errors=True)
        unwrap(policy).lm.save_pretrained(new, state_dict=weights)
        tokenizer.save_pretrained(new)
    barrier()
    if cfg.fsdp or rank == 0:  # tensors and plain values only: torch.load(weights_only=True) reads them back
        state = optimizer.state_dict()
        state["state"] = {i: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in moments.items()}
                          for i, moments in state["state"].items()}  # FSDP: this process's shard of each
        torch.save(state, os.path.join(new, f"optimizer-rank{rank}.pt" if cfg.fsdp else "optimizer.pt"))
    barrier()
    if rank == 0:
        torch.save(generators, os.path.join(new, "rng.pt"))
        with open(os.path.join(new, "trainer_state.json"), "w") as f:
            f.write(to_json({"step": summary["steps_done"], "algo": cfg.algo, "model": cfg.model,
                             "world_size": world_size, "summary": summary}, indent=2))
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def last_checkpoint(run: str) -> dict:
    """The trainer_state.json of the checkpoint a run resumes from, with its 'path': checkpoint/, or
    checkpoint.old/ after a kill between save_checkpoint's two renames (checkpoint.new/ may be
    half-written and is never read)."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(run, name)
        if os.path.isdir(path):
            try:  # NaN was written as null
                with open(os.path.join(path, "trainer_state.json")) as f:
                    return {**json.load(f, object_hook=lambda d: {k: math.nan if v is None else v
                                                                  for k, v in d.items()}), "path": path}
            except (OSError, ValueError):
                raise UserError(f"{path} has no readable trainer_state.json (a model without its training state, "
                                f"or a write cut off): nothing to resume; start a new run with --model {path}") from None
    raise UserError(f"{run} has no checkpoint to resume from: the run stopped before writing one "
                    "(--save-every N writes one every N steps)")


def read_training_state(checkpoint: str, fsdp: bool) -> tuple[dict, dict]:
    """(the AdamW state, this process's random generators) as save_checkpoint wrote them. Tensors
    and plain values only (weights_only=True): reading runs no code from the files."""
    import pickle

    rank, files = world()[0], (f"optimizer-rank{world()[0]}.pt" if fsdp else "optimizer.pt", "rng.pt")
    try:
        state, generators = (torch.load(os.path.join(checkpoint, f), map_location="cpu", weights_only=True)
                             for f in files)
    except (OSError, pickle.UnpicklingError) as e:
        raise UserError(f"{checkpoint}: {' or '.join(files)} is missing or holds more than tensors and plain "
                        f"values ({type(e).__name__}): not loaded") from None
    return state, generators[rank]


def restore_training_state(optimizer, rng, noise_rng, state: dict, generators: dict, device):
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, moments in state["state"].items():  # FSDP: each shard back into its parameter's layout
        p = params[i]
        for k, v in moments.items():
            if isinstance(p, DTensor) and k != "step":
                moments[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                                stride=p.stride())
    optimizer.load_state_dict(state)
    rng.setstate(generators["python"])
    noise_rng.set_state(generators["noise"])
    torch.set_rng_state(generators["torch"])
    if "cuda" in generators:
        torch.cuda.set_rng_state(generators["cuda"], device)


def keep_steps(path: str, last: int):
    """Drop the lines of a .jsonl log after step `last` (and a line cut off by a kill): a resumed
    run logs those steps again."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last:
                    kept.append(line.rstrip("\n") + "\n")
            except ValueError:
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# ====================================================================================
# 10. Training: warm-up, one RL step, evaluation, the loop
# ====================================================================================
def sft_warmup(policy: Policy, tokenizer, rows: list, prompts: list, cfg: Config, rng: random.Random) -> int:
    """Supervised warm-up on worked solutions (prompt tokens masked), so that RL starts from a
    model that gets some answers right. Every 10 steps it checks greedy accuracy on 64 training
    problems and stops once that reaches --sft-target. The toy task is learnt in a sharp step:
    a fixed number of steps lands anywhere on that step depending on the CPU's rounding, while
    a target lands at the same accuracy on any machine. Returns the number of steps taken."""
    device = next(policy.parameters()).device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr)
    check = rng.sample(range(len(rows)), min(64, len(rows)))
    policy.train()
    for step in tqdm(range(1, cfg.sft_steps + 1), desc="warm-up (SFT)", leave=False, disable=world()[0] > 0):
        picks = rng.sample(range(len(rows)), min(cfg.sft_batch_size, len(rows)))
        seqs, labels = [], []
        for i in picks:
            target = tokenizer(rows[i]["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(prompts[i] + target)
            labels.append([-100] * len(prompts[i]) + target)
        with autocast(device, cfg.bf16):
            loss = policy.lm(input_ids=pad_right(seqs, tokenizer.pad_token_id, device),
                             attention_mask=pad_right([[1] * len(x) for x in seqs], 0, device),
                             labels=pad_right(labels, -100, device), use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))
        optimizer.step()
        if cfg.sft_target and step % 10 == 0:
            batch = rollout(policy, tokenizer, [prompts[i] for i in check], [rows[i]["answer"] for i in check], 1,
                            cfg, greedy=True)
            policy.train()
            if batch["rewards"].mean() >= cfg.sft_target:
                return step
    return cfg.sft_steps


def pad_right(rows: list[list[int]], value: int, device) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], device=device)


def micro_batches(n: int, width: int, cfg: Config) -> list[slice]:
    """Row slices of at most --micro-batch-size responses, else of at most --micro-batch-tokens
    tokens (rows x `width`, the padded sequence length), else one slice."""
    size = cfg.micro_batch_size or (max(1, cfg.micro_batch_tokens // width) if cfg.micro_batch_tokens else n)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def frozen_logprobs(policy, input_ids, attention_mask, n_response: int, cfg: Config):
    """token_logprobs without gradients, over the same micro-batches as the update: the old
    policy's when --mu > 1, and the reference model's."""
    chunks = micro_batches(len(input_ids), all_max(input_ids.shape[1], input_ids.device), cfg)
    return torch.cat([token_logprobs(policy, input_ids[s], attention_mask[s], n_response, cfg.temperature, cfg.bf16)
                      for s in chunks])                                                  # (N, T)


def sample_batch(policy, tokenizer, draw, cfg: Config) -> dict:
    """Roll out G responses for each prompt that draw() returns (with its gold answers and
    sampling noise), and verify them (Algorithm 1's sampling). --algo dapo adds DAPO's dynamic
    sampling: groups whose rewards are all equal carry no GRPO signal and are dropped, and more
    prompts are drawn until the batch is full of mixed groups (at most --max-resample rounds; if
    none is mixed by then, the last round is kept as it is). Under torchrun every process draws
    the same number of rounds, and a batch short of mixed groups is topped up with the last
    round's uniform ones (advantage 0), so that every process holds the same number of rows."""
    t0, G = time.perf_counter(), cfg.group_size
    parts, keep, n_mixed, b = [], [], 0, 0
    with full_weights(policy) as sampler:
        for _ in range(cfg.max_resample if cfg.algo == "dapo" else 1):
            prompts, golds, noise = draw()
            b = len(prompts)  # this process's share of --prompts-per-step
            batch = rollout(sampler, tokenizer, prompts, golds, G, cfg, noise=noise)
            mixed = batch["rewards"].view(-1, G).std(1) > 0                              # (b,)
            mixed &= mixed.cumsum(0) <= b - n_mixed  # no more than the batch needs
            parts.append(batch)
            keep.append(mixed.repeat_interleave(G))
            n_mixed += int(mixed.sum())
            if all_sum(n_mixed < b, batch["rewards"].device) == 0:  # full on every process
                break
    if cfg.algo == "dapo" and world()[1] > 1 and 0 < n_mixed < b:
        uniform = ~keep[-1].view(-1, G)[:, 0]
        keep[-1] |= (uniform & (uniform.cumsum(0) <= b - n_mixed)).repeat_interleave(G)
    if cfg.algo == "dapo" and n_mixed:
        batch = cat_rollouts(parts, keep, tokenizer.pad_token_id)
    return {**batch, "time_sample": time.perf_counter() - t0, "groups_sampled": len(parts) * b}


def rl_step(policy, ref_model, optimizer, batch: dict, cfg: Config) -> dict:
    """One update on a sampled batch (the rest of Algorithm 1): entropy proxy, advantages, then
    `mu` PPO-clip optimizer steps. Returns the step's metrics (over all processes)."""
    t0 = time.perf_counter()
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    rewards, G = batch["rewards"], cfg.group_size
    n, n_response, world_size = ids.shape[0], mask.shape[1], world()[1]
    chunks = micro_batches(n, all_max(ids.shape[1], ids.device), cfg)
    # The old policy is the sampler: with one epoch (mu = 1) the update's own forward, detached,
    # is pi_old (the first ratio is exactly 1, as in TRL); with more, its log-probs recomputed once.
    old = frozen_logprobs(policy, ids, attn, n_response, cfg) if cfg.mu > 1 else None  # (N, T)
    ref = frozen_logprobs(ref_model, ids, attn, n_response, cfg) if ref_model is not None else None
    entropy = sequence_entropy(batch["logprobs"], batch["entropy_mask"])                 # (N,)   Eq. 5
    adv = grpo_advantages(rewards, G)                                                    # (N,)   Eq. 2
    if cfg.algo == "egpo":                                                               #        Eqs. 7-11, 13
        adv_hat = egpo_advantages(rewards, entropy, G, calibration=cfg.calibration, lambda_min=cfg.lambda_min,
                                  lambda_max=cfg.lambda_max, nsr=cfg.nsr, renorm=cfg.renorm)
    elif cfg.algo == "edge-grpo":
        # EDGE-GRPO, a baseline of Table 1: w = clip(Pbar / (P + 1e-6), 0.5, 2.0) for every response,
        # P the mean full-distribution token entropy (the sampler's), no NSR: a symmetric clamp
        p = (batch["token_entropy"] * mask).sum(1) / mask.sum(1)                         # (N,)   P_i
        adv_hat = egpo_advantages(rewards, p, G, calibration="symmetric", lambda_min=0.5, lambda_max=2.0,
                                  nsr="off", eps_h=1e-6)
    else:  # grpo, dapo
        adv_hat = adv

    # Each chunk's loss is weighted by its share of the tokens (or responses) of the whole batch,
    # over all processes, so the accumulated gradient is that of the whole batch under either
    # aggregation; DDP and FSDP average the processes' gradients, hence the factor world_size.
    n_tokens = all_sum(mask.sum(), ids.device)
    total = n_tokens if cfg.loss_agg == "token-mean" else all_sum(n, ids.device)
    logs = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}
    policy.train()
    for _ in range(cfg.mu):
        optimizer.zero_grad()
        for s in chunks:
            with gradient_sync(policy, s is chunks[-1]):  # reduced across processes after the last one only
                logprobs = token_logprobs(policy, ids[s], attn[s], n_response, cfg.temperature, cfg.bf16)
                loss, stats = policy_loss(logprobs, logprobs.detach() if old is None else old[s], adv_hat[s],
                                          mask[s], clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                                          ref_logprobs=None if ref is None else ref[s], beta=cfg.beta,
                                          loss_agg=cfg.loss_agg)                                  # Eq. 12
                share = (mask[s].sum() if cfg.loss_agg == "token-mean" else s.stop - s.start) / total
                (loss * share * world_size).backward()
            logs["loss"] += loss.item() * float(share) / cfg.mu
            for k in ("kl", "clip_frac"):
                logs[k] += stats[k] * float(mask[s].sum() / n_tokens) / cfg.mu
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))  # 0: none
        logs["grad_norm"] += float(norm) / cfg.mu
        optimizer.step()
    time_update = time.perf_counter() - t0

    for k in ("loss", "kl", "clip_frac"):
        logs[k] = all_sum(logs[k], ids.device).item()
    if ids.is_cuda:
        logs["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated(ids.device) / 2 ** 30
    if cfg.log_completions:  # train() moves these to completions.jsonl; all processes' rows, in order
        columns = zip(batch["prompts"], batch["texts"], *(x.tolist() for x in (rewards, entropy, adv, adv_hat)))
        rows = [{"prompt": prompt, "completion": text, "reward": r, "entropy": h, "advantage": a,
                 "egpo_advantage": a_hat} for prompt, text, r, h, a, a_hat in columns]
        logs["completions"] = [{"group": i // G, **row} for i, row in enumerate(all_gather_objects(rows))]
    rewards, entropy, adv, adv_hat, truncated = all_gather(rewards, entropy, adv, adv_hat, batch["truncated"])
    return {**calibration_metrics(rewards, entropy, adv, adv_hat, G), **logs,
            "completion_len": n_tokens.item() / len(rewards), "truncated_frac": truncated.float().mean().item(),
            "groups_sampled": int(all_sum(batch["groups_sampled"], ids.device)), "time_sample": batch["time_sample"],
            "time_update": time_update, "tokens_per_s": n_tokens.item() / batch["time_sample"]}


@torch.no_grad()
def evaluate(policy, tokenizer, prompts: list, golds: list, cfg: Config, prefix: str = "") -> dict:
    """The paper's protocol (Section 4.1) on one set of problems: one greedy answer and k =
    --eval-samples sampled ones per problem (--eval-temperature, --eval-top-p, --eval-top-k, at most
    --eval-max-new-tokens). Returns, with keys prefixed by `prefix`: the greedy accuracy, the
    mean pass@1 (each problem's accuracy over its k samples, averaged) with its standard error
    over problems, the fraction of samples cut off at the length limit, and on the samples the
    AUROC of -H as a predictor of correctness and the mean H of all, right and wrong ones
    (Section 4.4's gap). The sampling noise comes from its own generator, seeded by --seed:
    every evaluation sees the same noise, and the training's is untouched. Under torchrun each
    process evaluates a contiguous share of the problems, and the results are gathered."""
    rank, world_size = world()
    k = cfg.eval_samples
    ecfg = dataclasses.replace(cfg, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, top_k=cfg.eval_top_k,
                               max_new_tokens=cfg.eval_max_new_tokens)
    noise = torch.rand(len(prompts) * k, ecfg.max_new_tokens, generator=torch.Generator().manual_seed(cfg.seed + 1))
    lo, hi = rank * len(prompts) // world_size, (rank + 1) * len(prompts) // world_size
    chunk = max(1, cfg.prompts_per_step // world_size * cfg.group_size // k)  # problems per rollout, as training
    device = next(policy.parameters()).device
    parts = {key: [torch.zeros(0, device=device)] for key in ("greedy", "sampled", "entropy", "truncated")}
    with full_weights(policy) as sampler:
        for i in tqdm(range(lo, hi, chunk), desc=f"eval {prefix or 'held-out'}", leave=False, disable=rank > 0):
            p, g = prompts[i:min(i + chunk, hi)], golds[i:min(i + chunk, hi)]
            parts["greedy"].append(rollout(sampler, tokenizer, p, g, 1, ecfg, greedy=True)["rewards"])
            batch = rollout(sampler, tokenizer, p, g, k, ecfg, noise=noise[i * k:(i + len(p)) * k])
            parts["sampled"].append(batch["rewards"])
            parts["entropy"].append(sequence_entropy(batch["logprobs"], batch["entropy_mask"]))
            parts["truncated"].append(batch["truncated"].float())
    greedy, sampled, entropy, truncated = all_gather(*(torch.cat(parts[key]) for key in parts))
    pass1 = sampled.view(-1, k).mean(1)                                                   # (problems,)
    valid, correct = ~entropy.isnan(), sampled > 0
    metrics = {"eval_acc": greedy.mean(), "eval_acc_sampled": pass1.mean(),
               "eval_acc_sampled_se": pass1.std() / len(pass1) ** 0.5 if len(pass1) > 1 else torch.nan,
               "eval_truncated": truncated.mean(),
               "eval_auroc": auroc(-entropy[valid], sampled[valid]), "eval_entropy": entropy.nanmean(),
               "eval_entropy_correct": entropy[correct].nanmean(),      # Section 4.4: the gap between these
               "eval_entropy_incorrect": entropy[~correct].nanmean()}   # two (NaN if a class is empty)
    return {prefix + key: float(value) for key, value in metrics.items()}


def eval_sets(cfg: Config, tokenizer, held_out: list) -> dict:
    """{key prefix: (prompts, golds)}: the held-out split (prefix '', in the training set's format),
    or each of --eval-datasets, whole, in its own format (prefix 'NAME/': a hub dataset's name, the
    NAME of NAME=PATH, or a local file's stem)."""
    sets = {"": (cfg.dataset, held_out)} if held_out and not cfg.eval_datasets else {}
    for spec in filter(None, (cfg.eval_datasets or "").split(",")):
        name, _, path = spec.strip().partition("=")
        name = name if path or name in DATASETS else os.path.splitext(os.path.basename(name))[0]
        if name + "/" in sets:
            raise UserError(f"--eval-datasets names {name} twice: rename a file, or give it as NAME=PATH")
        sets[name + "/"] = (spec, read_dataset(spec))
    return {prefix: ([build_prompt(tokenizer, r["question"], dataset, cfg.thinking) for r in rows],
                     [r["answer"] for r in rows]) for prefix, (dataset, rows) in sets.items()}


def to_json(x, **kwargs) -> str:
    """json.dumps with every NaN or infinity written as null: NaN is not JSON (jq, JavaScript)."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return {k: finite(v) for k, v in x.items()} if isinstance(x, dict) else \
            [finite(v) for v in x] if isinstance(x, list) else x
    return json.dumps(finite(x), allow_nan=False, **kwargs)


def train(cfg: Config) -> dict:
    """The whole run: model, data, warm-up, RL with logging and checkpoints, summary; with --resume,
    the rest of a run from its last checkpoint. Under torchrun every process runs this; rank 0
    alone prints and writes files."""
    device = init_distributed(cfg)
    rank, world_size = world()
    resumed = last_checkpoint(cfg.resume) if cfg.resume else None
    if resumed and resumed["world_size"] != world_size:
        raise UserError(f"{cfg.resume} ran on {resumed['world_size']} process(es): resume it on as many "
                        f"(torchrun --nproc_per_node {resumed['world_size']})")
    if resumed and cfg.steps <= resumed["step"]:
        raise UserError(f"{cfg.resume} has done {resumed['step']} steps of its --steps {cfg.steps}: give --steps "
                        "N with N larger to train on")
    if resumed:  # read now: a bad file stops the run before anything in the folder changes
        resumed["optimizer"], resumed["generators"] = read_training_state(resumed["path"], cfg.fsdp)
    if is_tiny(cfg.model) and device.type == "cpu":
        # One thread: the 0.14M-parameter model gains little from more, and the sum order of a
        # reduction depends on the thread count. The tiny demo thus prints the same numbers
        # whatever the number of cores.
        torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    rng, noise_rng = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    policy, tokenizer = load_policy(cfg, device, resumed and resumed["path"])
    eval_only = cfg.steps == 0 and not cfg.sft_steps and cfg.eval_datasets  # no training set needed
    train_rows, test_rows = ([], []) if eval_only else load_rows(cfg)
    train_prompts = [build_prompt(tokenizer, r["question"], cfg.dataset, cfg.thinking) for r in train_rows]
    if cfg.dataset.startswith("openr1"):  # the paper's filter: prompts of at most 1024 tokens
        kept = [i for i, p in enumerate(train_prompts) if len(p) <= 1024]
        train_rows, train_prompts = [train_rows[i] for i in kept], [train_prompts[i] for i in kept]
        test_rows = [r for r in test_rows
                     if len(build_prompt(tokenizer, r["question"], cfg.dataset, cfg.thinking)) <= 1024]
    if not train_rows and not eval_only:
        raise UserError(f"no training problems left after holding out --eval-size {cfg.eval_size}: lower it")
    evals = eval_sets(cfg, tokenizer, test_rows)
    limit = context_length(policy.lm, tokenizer)
    lengths = [(train_prompts, cfg.max_new_tokens, "--max-new-tokens")]
    lengths += [(prompts, cfg.eval_max_new_tokens, "--eval-max-new-tokens") for prompts, _ in evals.values()]
    for prompts, new_tokens, flag in lengths:
        if prompts and max(map(len, prompts)) + new_tokens > limit:
            raise UserError(f"a prompt is {max(map(len, prompts))} tokens; with {flag} {new_tokens} that exceeds "
                            f"the model's context of {limit}: use shorter questions or lower {flag}")
    if cfg.sft_steps and not all("solution" in r for r in train_rows):
        raise UserError("--sft-steps needs worked solutions (the toy task, or GSM8K-style '... #### N' answers)")

    cfg.out = cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.algo}-"
                                      + os.path.basename(cfg.model.rstrip("/")))
    files = [os.path.join(cfg.out, "metrics.jsonl"),
             os.path.join(cfg.out, "completions.jsonl") if cfg.log_completions else os.devnull]
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        config = {**dataclasses.asdict(cfg), "world_size": world_size, "torch": torch.__version__,
                  "command": " ".join(sys.argv)}
        if resumed:  # the run's config.json, with the flags that may change, and the command that resumed it
            with open(os.path.join(cfg.out, "config.json")) as f:
                saved = json.load(f)
            config = {**saved, **{k: config[k] for k in RESUMABLE + ("resume",)},
                      "resumed": saved.get("resumed", []) + [config["command"]]}
            for path in files[:1 + cfg.log_completions]:
                keep_steps(path, resumed["step"])
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            f.write(to_json(config, indent=2))
        method = f"egpo (calibration {cfg.calibration}, nsr {cfg.nsr}, renorm {cfg.renorm})" \
            if cfg.algo == "egpo" else cfg.algo
        print(f"egpo: {method} on {cfg.model} / {cfg.dataset}, {device}"
              + (f" x {world_size} processes ({'FSDP' if cfg.fsdp else 'DDP'})" if world_size > 1 else "")
              + f", {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_rows)} train problems, evaluation on "
              + (", ".join(f"{k[:-1] or 'held-out'} ({len(p)})" for k, (p, _) in evals.items()) or "nothing")
              + f" -> {cfg.out}")

    def evaluate_all() -> dict:
        return {k: v for prefix, (prompts, golds) in evals.items()
                for k, v in evaluate(policy, tokenizer, prompts, golds, cfg, prefix).items()}

    share = cfg.prompts_per_step // world_size

    def draw():  # this process's share of B training prompts, their gold answers and sampling noise
        picks = [rng.randrange(len(train_rows)) for _ in range(cfg.prompts_per_step)]  # the same on every process
        noise = torch.rand(cfg.prompts_per_step * cfg.group_size, cfg.max_new_tokens, generator=noise_rng)
        picks, rows = picks[rank * share:(rank + 1) * share], slice(rank * share * cfg.group_size,
                                                                    (rank + 1) * share * cfg.group_size)
        return [train_prompts[i] for i in picks], [train_rows[i]["answer"] for i in picks], noise[rows]

    def write_summary():
        if rank == 0:
            with open(os.path.join(cfg.out, "summary.json"), "w") as f:
                f.write(to_json(summary, indent=2))

    def stop_after_this_step(signum, _):  # Ctrl-C (SIGINT), or SIGTERM from a scheduler or torchrun
        if signum == signal.SIGINT and signal.SIGINT in stop:  # Ctrl-C twice: at once
            raise KeyboardInterrupt
        if not stop:
            print(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again: at once, without a "
                  "checkpoint)", file=sys.stderr)
        stop.append(signum)

    summary = {k: v for k, v in resumed["summary"].items() if k != "interrupted"} if resumed else {"steps_done": 0}
    saved, stop, handlers, consistent = summary["steps_done"] if resumed else None, [], {}, False
    try:  # from here on, Ctrl-C (or a crash) still leaves the checkpoint, metrics and summary so far
        with open(files[0] if rank == 0 else os.devnull, "a" if resumed else "w") as log, \
                open(files[1] if rank == 0 else os.devnull, "a" if resumed else "w") as log_c:
            if cfg.sft_steps and not resumed:  # every process warms up alike; parallelize() copies rank 0's weights
                summary["sft_steps_done"] = sft_warmup(policy, tokenizer, train_rows, train_prompts, cfg, rng)
            ref_model = None
            if cfg.beta > 0:  # the frozen initial policy, kept in the run folder for a resumed run
                reference = os.path.join(cfg.out, "reference")
                ref_model = load_policy(cfg, device, reference)[0] if resumed else copy.deepcopy(policy)
                if rank == 0 and not resumed:
                    ref_model.lm.save_pretrained(reference)
                    tokenizer.save_pretrained(reference)
                ref_model.eval().requires_grad_(False)
            policy = parallelize(policy, cfg)
            optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
            if resumed:
                restore_training_state(optimizer, rng, noise_rng, resumed["optimizer"], resumed["generators"], device)
            elif evals:
                summary["before"] = evaluate_all()
                write_summary()
            consistent = True  # what a checkpoint would hold is one state of the run (not a step half done)
            handlers = {sig: signal.signal(sig, stop_after_this_step) for sig in (signal.SIGINT, signal.SIGTERM)}
            bar = tqdm(range(summary["steps_done"] + 1, cfg.steps + 1), desc=cfg.algo, disable=rank > 0,
                       initial=summary["steps_done"], total=cfg.steps)
            for step in bar:
                consistent = False
                batch = sample_batch(policy, tokenizer, draw, cfg)
                metrics = {"step": step, **rl_step(policy, ref_model, optimizer, batch, cfg)}
                log_c.writelines(to_json({"step": step, **c}) + "\n" for c in metrics.pop("completions", []))
                if evals and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    metrics.update(evaluate_all())
                    summary["after"] = {k: metrics[k] for k in summary["before"]}
                log.write(to_json(metrics) + "\n")
                log.flush()
                log_c.flush()
                summary["steps_done"], consistent = step, True
                bar.set_postfix(acc=f"{metrics['acc']:.2f}", H=f"{metrics['entropy_mean']:.2f}",
                                auroc=f"{metrics['auroc_confidence']:.2f}")
                if cfg.save_every and step % cfg.save_every == 0:
                    save_checkpoint(policy, tokenizer, optimizer, generator_states(rng, noise_rng, device), summary,
                                    cfg)
                    saved = step
                if all_sum(len(stop), device) > 0:  # every process stops after the same step
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        summary["interrupted"] = True
        if rank == 0:
            print(f"\ninterrupted after {summary['steps_done']} RL steps: saving what exists", file=sys.stderr)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        trained = summary["steps_done"] or "sft_steps_done" in summary  # an evaluation-only run has no new model
        if trained and consistent and saved != summary["steps_done"]:
            save_checkpoint(policy, tokenizer, optimizer, generator_states(rng, noise_rng, device), summary, cfg)
        write_summary()
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return summary


def print_summary(summary: dict, cfg: Config):
    """One table per evaluation (before and after RL): a row per benchmark."""
    if "sft_steps_done" in summary:
        print(f"\nwarm-up: {summary['sft_steps_done']} supervised steps")
    k = cfg.eval_samples
    for stage, title in [("before", "before RL"), ("after", f"after {summary['steps_done']} RL steps")]:
        if stage not in summary:
            continue
        r = summary[stage]
        print(f"\n{title:24s} {'greedy':>7s} {f'pass@1 ± s.e. (k={k})':>19s} {'truncated':>9s} {'AUROC of -H':>11s} "
              f"{'H right':>7s} {'H wrong':>7s}")
        for prefix in sorted({key[:-len("eval_acc")] for key in r if key.endswith("eval_acc")}):
            x = {key[len(prefix):]: value for key, value in r.items() if key.startswith(prefix)}
            print(f"{prefix[:-1] or 'held-out':24s} {100 * x['eval_acc']:6.1f}% {100 * x['eval_acc_sampled']:10.1f}% "
                  f"± {100 * x['eval_acc_sampled_se']:4.1f}% {100 * x['eval_truncated']:8.1f}% "
                  f"{x['eval_auroc']:11.3f} "
                  f"{x['eval_entropy_correct']:7.3f} {x['eval_entropy_incorrect']:7.3f}")
    files = "metrics.jsonl, " + "completions.jsonl, " * cfg.log_completions + "config.json, summary.json"
    saved = f" and the model in {cfg.out}/checkpoint/" if summary["steps_done"] or cfg.sft_steps else ""
    print(f"\nwrote {cfg.out}/{files}{saved}")


# ====================================================================================
# 11. Command line
# ====================================================================================
def parse_args(argv=None) -> Config:
    """The command line as a Config. With --resume RUN: RUN's config.json, in which only the flags of
    RESUMABLE may be given again with another value."""
    import argparse

    parser = argparse.ArgumentParser(prog="egpo.py", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:  # --flag; an auto (None) default also gets --no-flag
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            parser.add_argument(name, action=action, default=f.default, help=help)
            continue
        help += "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(name, type=f.type, default=f.default, choices=f.metadata["choices"], help=help)
    cfg = Config(**vars(parser.parse_args(argv)))
    if not cfg.resume:
        return cfg
    missing = object()  # which flags were given: parse again with every default replaced by this
    parser.set_defaults(**{f.name: missing for f in dataclasses.fields(Config)})
    given = {k for k, v in vars(parser.parse_args(argv)).items() if v is not missing} - {"resume"}
    if given & {"model", "out"}:
        raise UserError(f"--{min(given & {'model', 'out'})}: --resume continues the run's own model in its own "
                        "folder; drop it")
    try:
        with open(os.path.join(cfg.resume, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"--resume {cfg.resume}: not a run folder (no readable config.json); pass the --out "
                        "folder of a run") from None
    changed = sorted(k for k in given - set(RESUMABLE) if getattr(cfg, k) != saved.get(k))
    if changed:
        flag, k = "--" + changed[0].replace("_", "-"), changed[0]
        raise UserError(f"{flag} {getattr(cfg, k)} differs from the run's {flag} {saved.get(k)}: a resumed run "
                        "keeps its config; only --steps and --save-every may change")
    checkpoint = last_checkpoint(cfg.resume)  # nothing to resume from: say so now
    if (checkpoint["algo"], checkpoint["model"]) != (saved["algo"], saved["model"]):
        raise UserError(f"{checkpoint['path']} was written by --algo {checkpoint['algo']} --model "
                        f"{checkpoint['model']}, but the run's config.json says --algo {saved['algo']} --model "
                        f"{saved['model']}: they are not one run")
    resumed = Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})
    resumed.resume = resumed.out = cfg.resume
    for k in given & set(RESUMABLE):
        setattr(resumed, k, getattr(cfg, k))
    return resumed


def main(argv=None):
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # no retry chatter when the hub is unreachable: our error says it once
    try:
        cfg = resolve(parse_args(argv))
        summary = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", 0)) == 0:  # torchrun's rank; train() has left the process group
        print_summary(summary, cfg)
    if summary.get("interrupted"):
        sys.exit(130)


if __name__ == "__main__":
    main()
