"""EGPO: entropy-calibrated group policy optimisation, in one readable file.

Zhao et al., "Know What You Know: Metacognitive Entropy Calibration for Verifiable RL Reasoning",
arXiv:2602.22751 (equation numbers below are the paper's). EGPO is GRPO (0/1 verifier reward,
group-normalised advantages, PPO-clip update) in which each response's advantage is scaled by how
confident the model was when it wrote it, and in which a group of only wrong answers is pushed
down instead of ignored.

    python egpo.py                            # offline demo: tiny model, toy task, CPU, a minute
    python egpo.py --algo grpo                # the same run with GRPO (also dapo, edge-grpo)
    python egpo.py --calibration symmetric    # an ablation of the paper's Table 2 (C1)
    python egpo.py --model Qwen2.5-0.5B       # a real model on GSM8K (CUDA, bf16 autocast)
    torchrun --nproc_per_node 8 egpo.py --model Qwen2.5-Math-7B --fsdp    # 8 GPUs, sharded
    python egpo.py --resume runs/<run>        # continue a stopped run where it stopped

Part I, the method, in the order of Algorithm 1:
    Eq. 5           entropy proxy H_i: mean NLL of the sampled response    sequence_entropy
    Eq. 2           GRPO advantage A_i                                      grpo_advantages
    Eq. 7           raw confidence weight w^_i = Hbar / (H_i + eps_H)       confidence_ratio
    Eqs. 8-9        asymmetric clamp (and renorm): the weight w_i           calibration_weights
    Eqs. 10-11, 13  group types, NSR: A~_i = w_i A_i                        egpo_advantages
    Eq. 12          PPO-clip surrogate + k3 KL                              policy_loss
    Algorithm 1     sample and verify; Eqs. 5, 2, 7-13; update              sample_batch, rl_step
                    the sampler (prefill + KV cache) and its log-probs      sample, rollout
                    warm-up, RL steps, evaluation, checkpoints              train
Part II is an appendix of plumbing, to skip on a first read: the model's forward and the update's
micro-batches, the verifier, datasets and prompts, model loading, step metrics and evaluation,
torchrun, checkpoints and the run's files, the flags' checks and main.
"""
import argparse, contextlib, copy, dataclasses, datetime, functools, gc, inspect, json, math, os
import pickle, random, re, shutil, signal, string, sys, time, uuid
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from tqdm.auto import tqdm  # tqdm ships with transformers and datasets


# ==================================================================================================
# Part I: the method
# ==================================================================================================
def flag(default, help, choices=None, check=None):
    """A Config field: its default, one line of --help, and its `choices` ('a b c') or its range
    `check` ('(0, 1]')."""
    return field(default=default,
                 metadata={"help": help, "choices": choices and choices.split(), "check": check})

@dataclass
class Config:
    """Every flag of `python egpo.py`. A default of None is "auto": AUTO's, or resolve()'s."""
    # --- the run
    model: str = flag("tiny", "tiny (built here), an alias (Qwen2.5-0.5B), a hub id or a folder")
    dataset: str = flag(None, "toy | gsm8k | math500 | openr1 | a local file | NAME=PATH")
    device: str = flag("auto", "cpu | cuda [cpu for tiny; cuda, if there is one]", "auto cpu cuda")
    seed: int = flag(0, "seed of the tiny model's init, the data and the sampling")
    out: str = flag(None, "folder of the run's files and checkpoint/ [runs/<time>-<algo>-<model>]")
    resume: str = flag(None, "continue the run in this folder from its last checkpoint")
    overwrite: bool = flag(False, "replace the run that --out holds (its files deleted first)")
    steps: int = flag(None, "RL steps; 0 = only the warm-up and an evaluation", check=">= 0")
    # --- the algorithm: Table 1's baselines are --algo values, Table 2's ablations flags
    algo: str = flag("egpo", "egpo | grpo | dapo | edge-grpo (Table 1)", "egpo grpo dapo edge-grpo")
    calibration: str = flag("asymmetric", "Eq. 8: asymmetric | symmetric (C1) | neg-only (C2) | "
                            "pos-only (C3)", "asymmetric symmetric neg-only pos-only")
    lambda_min: float = flag(0.8, "Eq. 8: lower clamp of the weight", check="(0, 1]")
    lambda_max: float = flag(2.0, "Eq. 8: upper clamp of the weight", check=">= 1")
    nsr: str = flag("entropy", "all-wrong groups, Eq. 13: entropy | flat (C4) | off",
                    "entropy flat off")
    renorm: str = flag("none", "Eq. 9, w / mean(w): none | after-clamp (C5) | before-clamp (C6)",
                       "none after-clamp before-clamp")
    entropy_span: str = flag("response", "Eq. 5's tokens: response | answer (after </think>); "
                             "under another --algo: only the logged entropies", "response answer")
    max_resample: int = flag(10, "dapo: sampling rounds at most to fill a batch", check=">= 1")
    # --- sampling
    prompts_per_step: int = flag(8, "B: prompts per RL step", check=">= 1")
    group_size: int = flag(8, "G: responses per prompt (TRL: num_generations)", check=">= 2")
    max_new_tokens: int = flag(None, "longest response", check=">= 1")
    temperature: float = flag(1.0, "sampling temperature (log-probs of logits / T)", check="> 0")
    top_p: float = flag(1.0, "nucleus sampling mass (1 = off)", check="(0, 1]")
    top_k: int = flag(0, "sample from the k likeliest tokens only (0 = off)", check=">= 0")
    max_num_seqs: int = flag(None, "responses sampled at once (vLLM, verl) [all]", check=">= 1")
    thinking: bool = flag(False, "Qwen3's chat template in thinking mode")
    # --- the update
    lr: float = flag(None, "AdamW learning rate", check="> 0")
    beta: float = flag(0.0, "weight of the k3 KL to the initial policy", check=">= 0")
    clip_eps_low: float = flag(0.2, "PPO clip: ratio >= 1 - clip_eps_low (TRL: epsilon)",
                               check="[0, 1)")
    clip_eps_high: float = flag(None, "PPO clip: ratio <= 1 + clip_eps_high [dapo 0.28, else 0.2]",
                                check=">= 0")
    loss_agg: str = flag("token-mean", "token-mean (TRL: dapo) | seq-mean-token-mean (TRL: grpo)",
                         "token-mean seq-mean-token-mean")
    mu: int = flag(1, "optimizer steps on each sampled batch (PPO epochs)", check=">= 1")
    max_grad_norm: float = flag(1.0, "gradient-norm clipping (0 = no clipping)", check=">= 0")
    micro_batch_size: int = flag(None, "responses per forward and backward [by tokens]",
                                 check=">= 1")
    micro_batch_tokens: int = flag(None, "tokens per forward and backward (verl)", check=">= 1")
    gradient_checkpointing: bool = flag(False, "trade compute for memory in the update")
    fsdp: bool = flag(False, "under torchrun: shard the model (FSDP2), not DDP")
    bf16: bool = flag(None, "bf16 autocast over fp32 weights, on CUDA [on if the GPU has bf16]")
    # --- the tiny model's warm-up and the toy task
    sft_steps: int = flag(None, "supervised warm-up steps, at most", check=">= 0")
    sft_target: float = flag(0.5, "end the warm-up at this greedy accuracy", check="[0, 1]")
    sft_lr: float = flag(3e-3, "learning rate of the warm-up", check="> 0")
    sft_batch_size: int = flag(64, "batch size of the warm-up", check=">= 1")
    toy_digits: int = flag(2, "operand digits of the toy additions (3: many all-wrong groups)",
                           check=">= 1")
    # --- evaluation and checkpoints
    eval_datasets: str = flag(None, "math500, aime24, minerva, gsm8k, mmlu-stem, files [held-out]")
    eval_samples: int = flag(None, "k: sampled answers per problem, for pass@1", check=">= 1")
    eval_temperature: float = flag(None, "evaluation temperature", check="> 0")
    eval_top_p: float = flag(None, "evaluation top-p", check="(0, 1]")
    eval_top_k: int = flag(None, "evaluation top-k", check=">= 0")
    eval_max_new_tokens: int = flag(None, "longest evaluation answer", check=">= 1")
    eval_every: int = flag(None, "evaluate every N steps (0: before and after RL)", check=">= 0")
    eval_size: int = flag(200, "problems of the training set held out for evaluation", check=">= 0")
    save_every: int = flag(None, "write checkpoint/ every N steps (0: at the end)", check=">= 0")
    log_completions: bool = flag(False, "write every sampled response to completions.jsonl (TRL)")

# The auto defaults: (the tiny model's, real models'), shown in --help as [tiny / real]. A value
# '--x' is flag x's value; the evaluation's for real models are the paper's (Section 4.1).
AUTO = {"dataset": ("toy", "gsm8k"), "steps": (100, 200), "max_new_tokens": (40, 512),
        "lr": (1e-4, 1e-6), "micro_batch_tokens": (None, 8192),
        "sft_steps": ("500 x --toy-digits", 0),
        "eval_samples": (1, 8), "eval_temperature": ("--temperature", 0.6),
        "eval_top_p": ("--top-p", 0.95), "eval_top_k": ("--top-k", 20),
        "eval_max_new_tokens": ("--max-new-tokens", "--max-new-tokens"),
        "eval_every": (0, 50), "save_every": (0, 50)}

# --- Eq. 5: the entropy proxy ---------------------------------------------------------------------
def sequence_entropy(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 5: H_i = -(1/|S_i|) sum_{t in S_i} log pi_old(o_t | q, o_<t), the mean NLL of the sampled
    response (a one-sample estimate of the policy's entropy). `logprobs` are the ones the sampler
    computed as it sampled, so it costs no forward pass; they feed Eq. 5 only. `mask` marks S_i (the
    response, or answer_mask's). Detached; NaN if S_i is empty (Eq. 7 then skips it)."""
    mask = mask.to(logprobs.dtype)
    n = mask.sum(-1)                                                                     # (N,)
    return torch.where(n > 0, -(logprobs.detach() * mask).sum(-1) / n.clamp(min=1), float("nan"))

# --- Eq. 2 and Eqs. 7-11, 13: the advantages ------------------------------------------------------
def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 2: A_i = (r_i - mean_j r_j) / (std_j r_j + eps), unbiased std over each group of
    `group_size` consecutive rows (as TRL and verl). A uniform group gives A = 0."""
    r = rewards.float().view(-1, group_size)                                             # (B, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)

def confidence_ratio(entropy: torch.Tensor, group_size: int, eps_h: float = 1e-5) -> torch.Tensor:
    """Eq. 7: w^_i = Hbar / (H_i + eps_H), Hbar the group's mean H over its valid responses;
    w^_i > 1: more confident than the group. A response without H (NaN) is left out of Hbar, and
    its w^ is 1."""
    h = entropy.float().view(-1, group_size)                                             # (B, G)
    w = h.nanmean(1, keepdim=True) / (h + eps_h)
    return torch.where(h.isnan(), 1.0, w).view(-1)

def calibration_weights(rewards: torch.Tensor, entropy: torch.Tensor, group_size: int, *,
                        calibration: str = "asymmetric", lambda_min: float = 0.8,
                        lambda_max: float = 2.0, renorm: str = "none",
                        eps_h: float = 1e-5) -> torch.Tensor:
    """Each response's weight w_i (Eqs. 7-9), per group of `group_size` rows:
    - Eq. 7: w^ = Hbar / (H + eps_h)                                       (confidence_ratio)
    - Eq. 8: c = clip(w^, lambda_min, lambda_max); w = max(1, c) if correct, min(1, c) if wrong:
      a right answer's weight is never below 1, a wrong answer's never above 1. Table 2:
      C1 symmetric: w = c for all; C2 neg-only: only wrong answers get min(1, c), right ones c;
      C3 pos-only: only right answers get max(1, c), wrong ones c.
    - Eq. 9 (optional): w <- w / mean_group(w), after the clamp (C5) or on w^ before it (C6)."""
    if calibration not in ("asymmetric", "symmetric", "neg-only", "pos-only") or \
            renorm not in ("none", "after-clamp", "before-clamp"):
        raise ValueError(f"unknown calibration={calibration!r} or renorm={renorm!r}")
    r = rewards.float().view(-1, group_size)                                             # (B, G)
    w_hat = confidence_ratio(entropy, group_size, eps_h).view(-1, group_size)            # Eq. 7
    if renorm == "before-clamp":                                                         # Eq. 9, C6
        w_hat = w_hat / w_hat.mean(1, keepdim=True)
    c = w_hat.clamp(lambda_min, lambda_max)                                              # Eq. 8
    w_correct = c.clamp(min=1.0) if calibration in ("asymmetric", "pos-only") else c  # not weakened
    w_wrong = c.clamp(max=1.0) if calibration in ("asymmetric", "neg-only") else c  # nor raised
    w = torch.where(r > 0, w_correct, w_wrong)
    if renorm == "after-clamp":                                                          # Eq. 9, C5
        w = w / w.mean(1, keepdim=True)
    return w.view(-1)

def egpo_advantages(rewards: torch.Tensor, entropy: torch.Tensor, group_size: int, *,
                    calibration: str = "asymmetric", lambda_min: float = 0.8,
                    lambda_max: float = 2.0, nsr: str = "entropy", renorm: str = "none",
                    eps: float = 1e-6, eps_h: float = 1e-5) -> torch.Tensor:
    """EGPO's calibrated advantages A~ (Section 3, Algorithm 1), per group of `group_size` rows:
    - Eqs. 7-9: the weight w of each response (calibration_weights);
    - Eq. 10: the base advantage: 0 in an all-correct group, Eq. 2's A in a mixed one, -1 in an
      all-wrong one (negative-sample reinforcement, NSR, Eq. 13; nsr="off": 0, as GRPO);
    - Eq. 11: A~ = w * base. All wrong: A~ = -w in [-1, -lambda_min], confident failures pushed
      down fully, uncertain ones more gently (nsr="flat", C4: w = 1, A~ = -1).

    Worked example, G = 4, rewards (1, 1, 0, 0), entropies (0.5, 2, 0.5, 2): Hbar = 1.25,
    w^ = (2.5, 0.625, 2.5, 0.625), A = (0.866, 0.866, -0.866, -0.866), w = (2, 1, 1, 0.8),
    A~ = (1.732, 0.866, -0.866, -0.693). All wrong with entropies (0.2, 0.5, 1.0, 2.3):
    w^ = (5, 2, 1, 0.43), A~ = (-1, -1, -1, -0.8).
    """
    if nsr not in ("entropy", "flat", "off"):
        raise ValueError(f"unknown nsr={nsr!r}")
    w = calibration_weights(rewards, entropy, group_size, calibration=calibration, eps_h=eps_h,
                            lambda_min=lambda_min, lambda_max=lambda_max, renorm=renorm)
    w, r = w.view(-1, group_size), rewards.float().view(-1, group_size)                  # (B, G)
    all_correct, all_wrong = r.amin(1, keepdim=True) > 0, r.amax(1, keepdim=True) <= 0   # (B, 1)
    if nsr == "flat":                                                                    # C4
        w = torch.where(all_wrong, 1.0, w)
    nsr_base = -1.0 if nsr in ("entropy", "flat") else 0.0                               # Eq. 13
    adv = grpo_advantages(rewards, group_size, eps).view(-1, group_size)               # Eq. 2
    base = torch.where(all_correct, 0.0, torch.where(all_wrong, nsr_base, adv))          # Eq. 10
    return (w * base).view(-1)                                                           # Eq. 11

# --- Eq. 12: the policy loss ----------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """token-mean: over all unmasked tokens; seq-mean-token-mean: over each response's tokens, then
    over responses."""
    if loss_agg == "token-mean":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    raise ValueError(f"loss_agg must be token-mean or seq-mean-token-mean, not {loss_agg!r}")

def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps_low=0.2, clip_eps_high=0.2,
                ref_logprobs=None, beta=0.0, loss_agg="token-mean"):
    """Eq. 12, per token: ratio = exp(logp - logp_old),
    pg = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), plus beta * KL_k3 with
    KL_k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman, "Approximating KL divergence", 2020).
    Returns (loss, {kl, clip_frac}), the stats as fractions of the masked tokens."""
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)                                           # (N, L)
    adv = advantages.unsqueeze(-1)                                                       # (N, 1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv
    per_token = -torch.min(unclipped, clipped)                                           # (N, L)
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1                                                # k3, >= 0
    if beta > 0:
        per_token = per_token + beta * kl
    loss = masked_mean(per_token, mask, loss_agg)
    clip_active = (clipped < unclipped).to(mask.dtype)  # exactly where the clip takes the gradient
    return loss, {"kl": masked_mean(kl.detach(), mask).item(),
                  "clip_frac": masked_mean(clip_active, mask).item()}

# --- Algorithm 1: one RL step ---------------------------------------------------------------------
def sample_batch(policy, tokenizer, draw, cfg: Config) -> dict:
    """Algorithm 1's sampling: G responses to each prompt that draw() gives this process (with its
    gold and its sampling noise), verified. --algo dapo draws until its groups are mixed
    (dynamic_sampling)."""
    t0 = time.perf_counter()
    with full_weights(policy, cfg.bf16) as sampler:  # FSDP: the weights gathered once for all
        if cfg.algo == "dapo":
            batch, groups = dynamic_sampling(sampler, tokenizer, draw, cfg)
        else:
            prompts, golds, noise = draw()
            batch = rollout(sampler, tokenizer, prompts, golds, cfg.group_size, cfg, noise=noise)
            groups = len(prompts)
    return {**batch, "time_sample": time.perf_counter() - t0, "groups_sampled": groups}

def rl_step(policy, ref_model, optimizer, batch: dict, cfg: Config) -> dict:
    """Algorithm 1's update on a sampled batch: Eq. 5, Eq. 2, EGPO's Eqs. 7-13 (or a baseline's
    advantages), then --mu PPO-clip optimizer steps over micro-batches (Eq. 12). Returns the step's
    metrics, over all processes."""
    t0 = time.perf_counter()
    ids, attn, mask, rewards = (batch[k] for k in ("input_ids", "attention_mask", "response_mask",
                                                   "rewards"))
    G, n_response = cfg.group_size, mask.shape[1]
    entropy = sequence_entropy(batch["logprobs"], batch["entropy_mask"])                 # Eq. 5
    adv = grpo_advantages(rewards, G)                                                    # Eq. 2
    if cfg.algo == "egpo":                                                               # Eqs. 7-13
        adv_tilde = egpo_advantages(rewards, entropy, G, calibration=cfg.calibration,
                                    lambda_min=cfg.lambda_min, lambda_max=cfg.lambda_max,
                                    nsr=cfg.nsr, renorm=cfg.renorm)
    elif cfg.algo == "edge-grpo":
        # Table 1's EDGE-GRPO: w = clip(Pbar / (P + 1e-6), 0.5, 2) for every answer, P the mean
        # entropy of the full distribution over the answer's tokens; no NSR
        p = (batch["token_entropy"] * mask).sum(1) / mask.sum(1)                         # (N,)
        adv_tilde = confidence_ratio(p, G, eps_h=1e-6).clamp(0.5, 2.0) * adv
    else:  # grpo, dapo
        adv_tilde = adv
    # pi_old, the policy that sampled the batch, gives Eq. 12's ratio its denominator. With --mu 1
    # (the paper's) the weights have not moved since sampling, so the update's own log-probs,
    # detached, are pi_old's: the ratio is exactly 1 and the clip never acts (DAPO's clip-higher
    # included). With --mu > 1 they are computed once, before the first epoch (as verl), and the
    # later epochs' ratios move off 1. The sampler's own log-probs feed Eq. 5 only.
    chunks = micro_batches(len(ids), int(all_reduce(ids.shape[1], ids.device, "max")), cfg)
    old = no_grad_logprobs(policy, ids, attn, n_response, cfg, chunks) if cfg.mu > 1 else None
    ref = no_grad_logprobs(ref_model, ids, attn, n_response, cfg, chunks) if ref_model else None
    weights, token_shares = loss_weights(mask, chunks, cfg)  # shares of the batch, all processes'
    logs = dict.fromkeys(("loss", "kl", "clip_frac", "grad_norm"), 0.0)
    policy.train()
    for _ in range(cfg.mu):
        optimizer.zero_grad()
        for s, weight, token_share in zip(chunks, weights, token_shares):
            with gradient_sync(policy, s is chunks[-1]):  # processes' gradients summed at the end
                logprobs = token_logprobs(policy, ids[s], attn[s], n_response, cfg.temperature,
                                          cfg.bf16)
                loss, stats = policy_loss(logprobs, logprobs.detach() if old is None else old[s],
                                          adv_tilde[s], mask[s], clip_eps_low=cfg.clip_eps_low,
                                          clip_eps_high=cfg.clip_eps_high, beta=cfg.beta,
                                          ref_logprobs=None if ref is None else ref[s],
                                          loss_agg=cfg.loss_agg)                         # Eq. 12
                (loss * weight).backward()
            logs["loss"] += loss.item() * weight / rank_and_world_size()[1] / cfg.mu
            for k in ("kl", "clip_frac"):
                logs[k] += stats[k] * token_share / cfg.mu
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                              cfg.max_grad_norm or float("inf"))
        logs["grad_norm"] += float(norm) / cfg.mu  # before clipping; --max-grad-norm 0: no clipping
        optimizer.step()
    return step_metrics(batch, entropy, adv, adv_tilde, logs, time.perf_counter() - t0, cfg)

def dynamic_sampling(sampler, tokenizer, draw, cfg: Config) -> tuple[dict, int]:
    """DAPO's dynamic sampling: uniform groups (all right or all wrong) are dropped and more prompts
    drawn until the batch is full of mixed groups, at most --max-resample rounds (none mixed: the
    last round is kept). Under torchrun every process draws as many rounds, and tops a batch still
    short up with uniform groups (advantage 0), so that all hold as many rows. Returns the batch and
    the number of groups drawn."""
    G, parts, keep, n_mixed = cfg.group_size, [], [], 0
    for _ in range(cfg.max_resample):
        prompts, golds, noise = draw()
        n_prompts = len(prompts)  # this process's share of B
        batch = rollout(sampler, tokenizer, prompts, golds, G, cfg, noise=noise)
        mixed = batch["rewards"].view(-1, G).std(1) > 0                            # (n_prompts,)
        mixed &= mixed.cumsum(0) <= n_prompts - n_mixed  # no more than the batch needs
        parts.append(batch)
        keep.append(mixed.repeat_interleave(G))
        n_mixed += int(mixed.sum())
        if all_reduce(n_mixed < n_prompts, batch["rewards"].device) == 0:  # full on every process
            break
    if n_mixed == 0:
        return batch, len(parts) * n_prompts
    if rank_and_world_size()[1] > 1 and n_mixed < n_prompts:
        uniform = ~keep[-1].view(-1, G)[:, 0]
        keep[-1] |= (uniform & (uniform.cumsum(0) <= n_prompts - n_mixed)).repeat_interleave(G)
    return cat_rollouts(parts, keep, tokenizer.pad_token_id), len(parts) * n_prompts

# --- the sampler and its log-probs ----------------------------------------------------------------
def token_logprobs(policy, input_ids, attention_mask, n_response: int, temperature: float,
                   bf16: bool = False):
    """log pi(o_t | q, o_<t) of the last `n_response` tokens, from the raw logits / temperature
    (never top-p-filtered ones): the update's forward, and the sampler's numbers recomputed."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # as generate() for left padding
    targets = input_ids[:, -n_response:]
    with autocast(input_ids.device, bf16):
        return policy(input_ids, attention_mask, position_ids, temperature,
                      targets=targets).view(targets.shape)                               # (N, L)

@torch.no_grad()
def sample(policy, input_ids, attention_mask, stop_ids: list[int], pad_id: int, max_new_tokens: int,
           *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, noise=None,
           bf16: bool = False):
    """Algorithm 1's sampler: one forward over the left-padded prompts (prefill), then one token per
    forward from the KV cache. noise None: greedy; else noise[:, t] (uniforms) picks token t by
    `pick` from softmax(logits / temperature): a row's sample depends on its own noise only, so one
    process or N sample the same. A row stops at its first token of `stop_ids` (pad_id after it).
    Returns (N, L) each: the tokens, their log-probs under softmax(logits / temperature) (the paper:
    "already computed during rollout generation"), and the distribution's entropy (EDGE-GRPO)."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    stop = torch.tensor(stop_ids, device=input_ids.device)
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    x, cache, tokens, logprobs, entropies = input_ids, None, [], [], []
    with autocast(input_ids.device, bf16):  # once: the weights are cast to bf16 at the first token
        for t in range(max_new_tokens):
            logits, cache = policy(x, attention_mask, position_ids, temperature, cache=cache)
            log_p = logits.log_softmax(-1)
            p = log_p.exp()
            token = logits.argmax(-1) if noise is None else pick(p, noise[:, t], top_p, top_k)
            token = token.masked_fill(done, pad_id)                                      # (N,)
            tokens.append(token)
            logprobs.append(log_p.gather(-1, token[:, None]).squeeze(-1))
            entropies.append(-(p * log_p).sum(-1))
            done |= torch.isin(token, stop)
            if done.all(): break  # the one wait for the GPU a token
            x, position_ids = token[:, None], position_ids[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, torch.ones_like(x)], 1)
    return torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(entropies, 1)

@torch.no_grad()
def rollout(policy, tokenizer, prompts: list[list[int]], golds: list[str], n: int, cfg: Config,
            greedy: bool = False, noise=None) -> dict:
    """`n` responses to each prompt, verified: rows k*n .. k*n+n-1 answer prompt k. `noise`
    (P*n, --max-new-tokens) drives the sampling (drawn here if not given), --max-num-seqs rows at
    a time. Returns input_ids (prompt + response), attention_mask, response_mask (up to and
    including the stop token), entropy_mask (Eq. 5's S_i), truncated (no stop token), the
    sampler's logprobs and token_entropy, rewards, texts and prompts (as text)."""
    device = next(policy.parameters()).device
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt").to(device)
    ids, attn = (batch[k].repeat_interleave(n, 0) for k in ("input_ids", "attention_mask"))
    if not greedy and noise is None:
        noise = torch.rand(len(ids), cfg.max_new_tokens)
    policy = unwrap(policy).eval()  # under FSDP, call it inside full_weights(): one gather for many
    stop_ids, pad_id = policy.lm.generation_config.eos_token_id, tokenizer.pad_token_id
    size = cfg.max_num_seqs or len(ids)  # each row's noise is its own: the same tokens at any size
    parts = [sample(policy, ids[i:i + size], attn[i:i + size], stop_ids, pad_id, cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, bf16=cfg.bf16,
                    noise=None if greedy else noise[i:i + size].to(device))
             for i in range(0, len(ids), size)]
    response, logprobs, token_entropy = (cat_padded([part[j] for part in parts], value)  # (P*n, L)
                                         for j, value in enumerate((pad_id, 0.0, 0.0)))
    response_mask = eos_mask(response, stop_ids)                                        # (P*n, L)
    entropy_mask = response_mask
    if cfg.entropy_span == "answer":
        think_end = tokenizer("</think>", add_special_tokens=False)["input_ids"]
        entropy_mask = answer_mask(response, response_mask, think_end)
    rows = [r[m].tolist() for r, m in zip(response.cpu(), response_mask.cpu())]  # one GPU copy
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    golds = [g for g in golds for _ in range(n)]
    rewards = torch.tensor([verify(t, g) for t, g in zip(texts, golds)], device=device)  # verify
    truncated = ~torch.isin(response, torch.tensor(stop_ids, device=device)).any(1)    # (P*n,)
    return {"input_ids": torch.cat([ids, response], 1),
            "attention_mask": torch.cat([attn, torch.ones_like(response)], 1),
            "response_mask": response_mask, "entropy_mask": entropy_mask, "truncated": truncated,
            "logprobs": logprobs, "token_entropy": token_entropy, "rewards": rewards,
            "texts": texts,
            "prompts": [p for p in tokenizer.batch_decode(prompts, skip_special_tokens=True)
                        for _ in range(n)]}

def eos_mask(response: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True for each response token up to and including the first stop token (the decision to stop
    is trained on), False for the padding after it; a truncated response is kept whole."""
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device)).long()
    return (is_eos.cumsum(1) - is_eos) == 0

def answer_mask(response: torch.Tensor, mask: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """--entropy-span answer (RQ4): the response tokens after the last `marker` (the ids of
    '</think>'), or the whole response if it has none."""
    k = len(marker)
    if k == 0 or response.shape[1] < k: return mask
    windows = response.unfold(1, k, 1)                                               # (N, L-k+1, k)
    hits = (windows == torch.tensor(marker, device=response.device)).all(-1) & mask[:, k - 1:]
    positions = torch.arange(hits.shape[1], device=response.device)
    last = torch.where(hits, positions, -1).amax(1, keepdim=True)                    # (N, 1)
    after = torch.arange(response.shape[1], device=response.device) >= last + k      # (N, L)
    return mask & torch.where(last >= 0, after, True)

# --- the training loop ----------------------------------------------------------------------------
def train(cfg: Config) -> dict:
    """The whole run: model, data, warm-up, RL steps with logs and checkpoints, evaluations and
    summary; with --resume, the rest of a run from its last checkpoint. Under torchrun every process
    runs this (rank 0 alone prints and writes files); main() tears the process group down after."""
    device, resumed = set_up(cfg)  # torchrun's processes, the checkpoint to resume from, the seeds
    policy, tokenizer = load_policy(cfg, device, resumed and resumed["path"])
    rows, prompts, evals = load_data(cfg, tokenizer, policy)
    rng, noise_rng = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    draw = prompt_draws(cfg, rows, prompts, rng, noise_rng)  # a step's prompts, golds and noise
    with Run(cfg, resumed, rng, noise_rng, device) as run:  # the folder, logs, Ctrl-C, checkpoints
        print_start(cfg, device, policy, rows, evals)
        if cfg.sft_steps and not resumed:  # supervised, so that RL starts with some right answers
            run.summary["sft_steps_done"] = sft_warmup(policy, tokenizer, rows, prompts, cfg, rng)
        ref_model = reference_model(policy, tokenizer, cfg, device, resumed) if cfg.beta else None
        policy = parallelize(policy, cfg)  # under torchrun: DDP or FSDP
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
        run.start(policy, tokenizer, optimizer, evals)  # a resumed run's state, or "before" RL
        for step in run.steps():
            batch = sample_batch(policy, tokenizer, draw, cfg)                # sample and verify
            metrics = rl_step(policy, ref_model, optimizer, batch, cfg)       # Eqs. 5, 2, 7-13, 12
            run.end_step(step, metrics)  # logs, evaluation, checkpoint; after a Ctrl-C, the end
    return run.summary


# ==================================================================================================
# Part II: appendix. The plumbing: skip it on a first read.
# ==================================================================================================
# --- the model's forward, the update's micro-batches, the sampler's helpers -----------------------
LOGIT_CHUNK = 1024  # positions whose fp32 logits exist at once: 1024 x 151,936 vocab x 4 B = 0.6 GB

class Policy(torch.nn.Module):
    """The causal LM `lm` behind the one forward that DDP and FSDP wrap: the LM's body, then its
    output layer in fp32 on the positions needed only, never the whole (N, L, vocabulary):
    - targets (N, L) given: log pi(target) at the last L positions, flat, from logits / temperature,
      LOGIT_CHUNK positions at a time, each chunk recomputed in the backward pass;
    - else: the last position's logits / temperature and the KV cache to continue from (sample)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm  # transformers before 5.24 name the cache argument past_key_values
        self.cache_name = "cache" if "cache" in inspect.signature(lm.base_model.forward).parameters else \
            "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, temperature: float, targets=None, cache=None):
        if targets is None and cache is None:
            cache = kv_cache(self.lm.config)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=targets is None, **{self.cache_name: cache})
        hidden, head = out.last_hidden_state, self.lm.get_output_embeddings().weight     # (N, P+L, d), (V, d)
        if targets is None:  # the model has added this step's keys and values to `cache`
            return fp32_logits(hidden[:, -1], head, temperature), cache                   # (N, V)
        hidden = hidden[:, -targets.shape[1] - 1:-1].flatten(0, 1)                       # (N*L, d)
        flat, parts = targets.flatten(), []
        for i in range(0, len(flat), LOGIT_CHUNK):
            chunk = (hidden[i:i + LOGIT_CHUNK], head, flat[i:i + LOGIT_CHUNK], temperature)
            recompute = torch.is_grad_enabled() and len(flat) > LOGIT_CHUNK  # one chunk: nothing to save
            parts.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, *chunk, use_reentrant=False)
                         if recompute else chunk_logprobs(*chunk))
        return torch.cat(parts)  # (N*L,): flat, as a view for an output would trip FSDP's backward hook

def fp32_logits(hidden, head, temperature: float):  # bf16 logits put up to 0.06 nats of error into a log-prob
    with torch.autocast(hidden.device.type, enabled=False):
        return (hidden.float() / temperature) @ head.float().T                           # (n, V)

def chunk_logprobs(hidden, head, targets, temperature: float):
    logits = fp32_logits(hidden, head, temperature)                                      # (n, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)        # (n,)

def pick(probs: torch.Tensor, u: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Inverse-CDF sampling: in each row, the first token at which the cumulative probability passes
    u * (the kept mass), u uniform in [0, 1). top_k > 0 keeps the k likeliest tokens, then top_p < 1
    the likeliest ones whose mass before them is < top_p (transformers' order and rules)."""
    order = None
    if top_k > 0 or top_p < 1:  # the k (or all) likeliest tokens, in decreasing order
        k = min(top_k, probs.shape[-1]) if top_k > 0 else probs.shape[-1]
        probs, order = probs.topk(k, -1)                                                 # (N, k)
        before = probs.cumsum(-1) - probs
        probs = torch.where(before < top_p * probs.sum(-1, keepdim=True), probs, 0.0)
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=probs.shape[-1] - 1)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)             # (N,)

def micro_batches(n: int, width: int, cfg: Config) -> list[slice]:
    """Row slices of --micro-batch-size rows, else of --micro-batch-tokens tokens (rows x `width`,
    the padded length), else one slice."""
    size = cfg.micro_batch_size or (max(1, cfg.micro_batch_tokens // width) if cfg.micro_batch_tokens else n)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]

@torch.no_grad()
def no_grad_logprobs(policy, input_ids, attention_mask, n_response: int, cfg: Config, chunks=None):
    """token_logprobs without gradients, in the update's micro-batches: pi_old's (--mu > 1) and the
    reference model's (--beta)."""
    chunks = chunks or micro_batches(len(input_ids), int(all_reduce(input_ids.shape[1], input_ids.device, "max")), cfg)
    return torch.cat([token_logprobs(policy, input_ids[s], attention_mask[s], n_response, cfg.temperature, cfg.bf16)
                      for s in chunks])                                                  # (N, L)

def cat_padded(xs: list[torch.Tensor], value) -> torch.Tensor:
    """2-D tensors stacked by rows, each right-padded with `value` to the widest."""
    width = max(x.shape[1] for x in xs)
    return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value) for x in xs])

def cat_rollouts(parts: list[dict], keep: list[torch.Tensor], pad_id: int) -> dict:
    """The rows keep[k] (a bool per row) of each rollout parts[k], stacked into one, prompts
    left-padded and responses right-padded to the widest (DAPO's dynamic sampling)."""
    n_resp = [part["response_mask"].shape[1] for part in parts]
    n_prompt = [part["input_ids"].shape[1] - n for part, n in zip(parts, n_resp)]
    P, L, out = max(n_prompt), max(n_resp), {}
    for key, value in [("input_ids", pad_id), ("attention_mask", 0), ("response_mask", 0), ("entropy_mask", 0),
                       ("logprobs", 0.0), ("token_entropy", 0.0)]:
        rows = []
        for part, k, p, n in zip(parts, keep, n_prompt, n_resp):
            x = part[key][k]
            left = P - p if x.shape[1] > n else 0  # input_ids and attention_mask hold the prompt too
            x = x if x.is_floating_point() else x.long()  # pad() takes no bool
            rows.append(torch.nn.functional.pad(x, (left, L - n), value=value).to(part[key].dtype))
        out[key] = torch.cat(rows)
    for key in ("rewards", "truncated"):
        out[key] = torch.cat([part[key][k] for part, k in zip(parts, keep)])
    for key in ("texts", "prompts"):
        out[key] = [x for part, k in zip(parts, keep) for x, kept in zip(part[key], k.tolist()) if kept]
    return out

# --- the verifier: the final answer, compared with the gold one mathematically --------------------
_BOXED, _TOKEN = re.compile(r"\\(?:boxed|fbox)\s*"), re.compile(r"[^\s${}]*")  # _TOKEN: '\boxed 5'
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textnormal|mbox|mathrm|mathbf|operatorname)"
                      r"\s*(?=\{)")
_SPACING = re.compile(r"\\\\|\\[,;: ]|~|\\(?:left|right)(?![A-Za-z])")  # a row break \\ is kept
_THOUSANDS = re.compile(r"(?<![\d.,])[1-9]\d{0,2}(?:,\d{3})+(?![\d,])")  # 1,234,567 (and 12,345.5)
_LAST_WORD = re.compile(r"(?<![A-Za-z])([A-Za-z]+)(?:\^\{?\d\}?|[²³])?$")  # cm^2, m²: a word
_UNITS = set("""mm cm m km g kg mg lb lbs oz s sec secs second seconds min mins minute minutes hr
hrs hour hours day days week weeks month months year years dollar dollars cent cents unit units
meter meters metre metres inch inches ft foot feet yd yard yards mile miles mph kph degree degrees
ml l liter liters litre litres gallon gallons sq square cubic per radian radians""".split())
_MIXED = re.compile(r"(-?)(\d+)\s*(\\frac\s*(?:\{\d+\}|\d)\s*(?:\{\d+\}|\d))")  # 3\frac{1}{2}
_LEXEME = re.compile(r"\d+(?:\.\d*)?|\.\d+|[A-Za-z]+|\\[A-Za-z]+|\S")  # letters: one symbol
_OPERATOR = {"\\cdot": "*", "\\times": "*", "\\div": "/"}
_BESIDE = ("(", "[", "{", "\\frac", "\\sqrt", "\\pi")  # a factor that starts a product: 2(x+1)
_PIECE = re.compile(r"\\(?:begin|end)\{\w*\*?\}|\\[{}]|\\(?:cup|cap|in|pm|mp|le|ge|leq|geq|ne|neq)"
                    r"(?![A-Za-z])|\\\\|[(\[{)\]},;=<>&]")  # brackets, and what separates parts
_BRACKETS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}

def _brace_pairs(s: str) -> dict[int, int]:
    """{index of each '{': index of its matching '}'}, in one pass; unmatched braces left out."""
    pairs, opened = {}, []
    for i, c in enumerate(s):
        if c == "{":
            opened.append(i)
        elif c == "}" and opened:
            pairs[opened.pop()] = i
    return pairs

def extract_answer(text: str) -> str | None:
    """What the last <answer>...</answer> holds (its last \\boxed{} if it has one), else the last
    non-empty \\boxed{...} (nested braces allowed; \\fbox too), else the text after the last '####'
    to the end of its line, else None. The tag is the R1-Zero format's final answer: a box outside
    it is reasoning (before it) or an afterthought (after it), and is ignored."""
    if not isinstance(text, str): return None
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, max(end, 0))
    tagged = text[start + 8:end].strip() if start >= 0 else ""
    text = tagged or text
    boxes = list(_BOXED.finditer(text))
    pairs = _brace_pairs(text) if boxes else {}
    for match in reversed(boxes):
        start = match.end()  # an unbalanced box gives '' and is skipped, like an empty one
        braced = text[start:start + 1] == "{"
        answer = (text[start + 1:pairs.get(start, start)].strip() if braced
                  else _TOKEN.match(text, start).group())
        if answer: return answer
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip() or None
    return tagged or None

def verify(completion: str, gold: str) -> float:
    """1.0 iff the completion's final answer equals `gold` mathematically: numbers and expressions
    exactly (x+6 = 6+x, √8 = 2√2; a decimal for 1/3 to a 1e-6 relative tolerance), tuples,
    intervals and matrices part by part, else as normalised strings (words whatever their case). A
    gold of one capital letter A-J is a multiple-choice option, which the answer must name alone.
    Never raises."""
    answer, gold = extract_answer(completion), gold if isinstance(gold, str) else str(gold)
    if re.fullmatch(r"[A-J]", gold.strip()):  # multiple choice: B, (B), B) 42, ANSWER: B
        if answer is None and isinstance(completion, str):
            answer = (re.findall(r"ANSWER:\s*(.*)", completion) or [None])[-1]
        m = re.fullmatch(r"\(?([A-J])[).:]?(?:\s+(.*))?", _unwrap(answer or "").strip())
        return float(bool(m) and m.group(1) == gold.strip()  # and no other choice in its text
                     and not re.search(r"(?<![A-Za-z])[A-J](?![A-Za-z])", m.group(2) or ""))
    if "####" in gold or _BOXED.search(gold):  # a whole GSM8K / MATH solution was passed as gold
        gold = extract_answer(gold) or ""
    if not answer or not gold.strip():
        return 0.0
    (x, a), (y, b) = _normalize(answer), _normalize(gold)
    return float((x == y or not (x and y)) and _same(a, b))  # x = 5 for 5, not for y = 5

def _same(a: str, b: str, depth: int = 0) -> bool:
    """Equal as strings, numbers or expressions, else part by part: a tuple's entries in order, an
    interval's brackets, an equation's sides, a matrix's entries. A set's too, in order: telling a
    set from a list of solutions or a tuple is guesswork, and strict costs only a right answer."""
    if _squeeze(a) == _squeeze(b):
        return True
    if all(re.fullmatch(r"[A-Za-z]{2,}( [A-Za-z]+)*", x) for x in (a, b)):  # words: Yes = yes
        return _squeeze(a).lower() == _squeeze(b).lower()
    if depth > 20 or max(len(a), len(b)) > 1000:  # bounds the time: a real answer is shorter
        return False
    p, q = _parse(a), _parse(b)
    if p is not None and q is not None:  # two expressions, with nothing to split
        if set(p) | set(q) <= {()}:  # numbers: exactly, unless a decimal stands for a fraction
            x, y = Fraction(p.get((), 0)), Fraction(q.get((), 0))  # that has no finite one (1/3)
            decimal = "." in a + b and not (_finite(x) and _finite(y))
            return x == y or decimal and abs(x - y) <= Fraction(1, 10 ** 6) * max(abs(x), abs(y))
        return p == q
    pa, pb = _split(a), _split(b)
    if pa and pb:
        return len(pa) == len(pb) and all(_same(x, y, depth + 1) if i % 2 == 0 else x == y
                                          for i, (x, y) in enumerate(zip(pa, pb)))
    return False

def _squeeze(s: str) -> str:
    """s without spaces, but for one between two digits ('2 1/2' is not '21/2')."""
    return re.sub(r"(?<!\d)\s+|\s+(?!\d)", "", s)

def _finite(x: Fraction) -> bool:
    """x has a finite decimal: its denominator divides a power of 10 (2^a 5^b)."""
    return 10 ** x.denominator.bit_length() % x.denominator == 0

def _split(s: str) -> list[str] | None:
    """[part, separator, part, ...] cut at s's top-level separators (',', '=', '\\cup', '\\\\'...),
    else ['', '(', inside, ']', ''] if one pair of brackets encloses s, else None."""
    depth, cuts, closing = 0, [], None
    for m in _PIECE.finditer(s):
        depth += (m.group() in _BRACKETS) - (m.group() in _BRACKETS.values())
        if depth < 0: return None
        if depth == 0 and m.group() in _BRACKETS.values():
            closing = closing or m
        elif depth == 0:
            cuts.append(m)
    opening = re.match(r"\\?[(\[{]", s)
    if not cuts and opening and closing and closing.end() == len(s):
        cuts = [opening, closing]
    edges = [0, *(i for m in cuts for i in m.span()), len(s)]
    return [s[i:j].strip() for i, j in zip(edges, edges[1:])] if cuts else None

def _parse(s: str) -> dict | None:
    """s as a polynomial {monomial: exact coefficient}, a monomial a sorted tuple of (symbol,
    power), if s is made of numbers, letters, + - * / ^, products side by side, \\frac, \\sqrt[n]{},
    \\pi and brackets, and stays small (200 characters, 1000 products a step); else None. Each
    step holds for all values of the letters (and principal roots), so two answers with one
    polynomial are equal: a wrong answer cannot pass for a right one."""
    s = _MIXED.sub(r"\1(\2+\3)", s) if _MIXED.fullmatch(s) else s  # a whole answer 3\frac12
    if len(s) > 200 or re.search(r"\d\s*\\frac", s):  # 2\frac12 inside: 2.5 or 2·(1/2)?
        return None
    tokens = [_OPERATOR.get(t, t) for t in reversed(_LEXEME.findall(s))]  # read from the end
    try:
        value = _sum(tokens)
        return None if tokens else value
    except (ValueError, ArithmeticError, IndexError, RecursionError):
        return None

def _sum(ts: list) -> dict:
    value = {}
    while True:
        sign = -1 if ts[-1] == "-" else 1
        if ts[-1] in ("+", "-"): ts.pop()
        for m, c in _term(ts).items():
            value[m] = value.get(m, 0) + sign * c
        if not ts or ts[-1] not in ("+", "-"): return {m: c for m, c in value.items() if c}

def _term(ts: list) -> dict:
    """Factors joined by * and / or side by side (2x, 3\\sqrt{2}, (x+1)(x-1)), with powers."""
    value, op = {(): Fraction(1)}, "*"
    while True:
        factor = _atom(ts)
        if ts and ts[-1] == "^":
            ts.pop()
            factor = _raise(factor, _argument(ts))
        value = _times(value, factor if op == "*" else _inverse(factor))
        beside = ts and (ts[-1][0].isalpha() or ts[-1] in _BESIDE)
        if op == "/" and beside: raise ValueError  # 1/2x: (1/2)x or 1/(2x)? ambiguous
        if not beside and not (ts and ts[-1] in ("*", "/")): return value
        op = "*" if beside else ts.pop()

def _argument(ts: list) -> dict:
    """TeX's argument: a {group} or one character, so \\frac12 is 1/2 and x^23 is x^2·3."""
    if len(ts[-1]) > 1 and ts[-1][0] != "\\":
        ts[-1:] = [ts[-1][1:], ts[-1][0]]
    return _atom(ts)

def _atom(ts: list) -> dict:
    t = ts.pop()
    if t[0].isdigit() or t[0] == ".": return {(): Fraction(t)} if Fraction(t) else {}
    if t[0].isalpha() and len(t) > 1 and ts and ts[-1] == "(":  # sin(x + y): a function's, not a
        raise ValueError(t)  # product's; a letter's, as 4b(a-b) or x(x-6), is read as a product
    if t[0].isalpha() or t == "\\pi": return {((t, 1),): Fraction(1)}
    if t == "\\frac": return _times(_argument(ts), _inverse(_argument(ts)))
    if t == "\\sqrt":
        index = _atom(ts) if ts[-1] == "[" else {(): Fraction(2)}  # \sqrt[3]{x}
        return _raise(_argument(ts), _inverse(index))
    if t not in _BRACKETS: raise ValueError(t)
    value = _sum(ts)
    if ts.pop() != _BRACKETS[t]: raise ValueError(t)
    return value

def _times(p: dict, q: dict) -> dict:
    """p·q, each prime's power kept in [0, 1) so that a number has one form: √8 = 2·2^(1/2)."""
    if len(p) * len(q) > 1000: raise OverflowError  # (a+1)(b+1)(c+1)...: too big to expand
    out = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            powers, c = dict(m1), c1 * c2
            for symbol, k in m2:
                powers[symbol] = powers.get(symbol, 0) + k
            for symbol, k in powers.items():
                if symbol.isdigit():  # a prime, from a root: its whole powers go to the coefficient
                    whole = math.floor(k)
                    c, powers[symbol] = c * Fraction(int(symbol)) ** whole, k - whole
            if c.numerator.bit_length() + c.denominator.bit_length() > 100_000: raise OverflowError
            m = tuple(sorted((symbol, k) for symbol, k in powers.items() if k))
            out[m] = out.get(m, 0) + c
    return {m: c for m, c in out.items() if c}

def _inverse(p: dict) -> dict:
    """1/p: a term's powers negated; 1/(x+1) a symbol of its own, equal only to itself."""
    if not p: raise ZeroDivisionError
    if len(p) > 1: return {((f"/{sorted(p.items())}", 1),): Fraction(1)}
    (m, c), = p.items()
    return _times({tuple((symbol, -k) for symbol, k in m): 1 / c}, {(): Fraction(1)})

def _raise(base: dict, exponent: dict) -> dict:
    """base^e for a rational e: whole powers of anything; roots only of one term with a positive
    coefficient and at most one letter, not raised: √(x²) is |x|; √(x·y) is not √x·√y."""
    e = exponent.get((), Fraction(0))
    bits = max((c.numerator.bit_length() + c.denominator.bit_length() for c in base.values()),
               default=2)
    if set(exponent) - {()} or abs(e.numerator) * bits > 100_000:  # x^y, 2^{2^{99}}: no answer
        raise OverflowError
    if e.denominator == 1:
        n, out, base = abs(e.numerator), {(): Fraction(1)}, _inverse(base) if e < 0 else base
        while n:  # by squaring
            out = _times(out, base) if n & 1 else out
            n >>= 1
            base = _times(base, base) if n else base
        return out
    (m, c), = base.items()
    letters = [k for symbol, k in m if not symbol.isdigit() and symbol != "\\pi"]
    if c < 0 or bits > 400 or letters not in ([], [1]): raise ValueError
    primes = [(str(p), 1) for p in _primes(c.numerator)]
    primes += [(str(p), -1) for p in _primes(c.denominator)]
    out = {(): Fraction(1)}
    for symbol, k in [*m, *primes]:
        out = _times(out, {((symbol, k * e),): Fraction(1)})
    return out

def _primes(n: int) -> list[int]:
    """n's prime factors below 1000, each as often as it divides n, then what is left if not 1."""
    out, p = [], 2
    while p * p <= n and p < 1000:
        if n % p == 0:
            out, n = out + [p], n // p
        else:
            p += 1
    return out + [n] * (n > 1)

def _normalize(s: str) -> tuple[str, str]:
    """(the variable it names, if it begins 'x =' or 'x \\in'; the answer without what does not
    change its value: outer braces, $, LaTeX spacing and text wrappers, \\left/\\right, degrees,
    percent, thousands separators, trailing unit words)."""
    s, k = s.strip().replace("\u2212", "-"), 0  # Unicode minus
    pairs = _brace_pairs(s) if s.startswith("{") else {}
    while pairs.get(k) == len(s) - 1 - k > k:  # '{{5}}' -> '5', every layer in one pass
        k += 1
    s = re.sub(r",\s*\\!\s*", ",", s[k:len(s) - k].strip()).replace("{,}", ",")
    s = s.replace("\\!", "").replace("\\$", "").replace("$", "")
    s = _SPACING.sub(lambda m: m.group() if m.group() == "\\\\" else " ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = _unwrap(_strip_thousands(s))  # '2, 500' stays a list; 5\text{ cm} -> '5 cm', unit below
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree|\\%|%|\bpercent\b|\bpct\b", "", s)
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    named = re.match(r"([a-zA-Z])\s*(?:=|\\in(?![a-z]))\s*", s.strip())  # x = 5, x \in [1, 2]
    s = s.strip()[named.end() if named else 0:].strip().rstrip(".").strip()
    if "," not in s and (_split(s) or [])[1:4:2] == ["(", ")"]:  # (1/3) -> 1/3; not (1, 2), (x)(y)
        s = s[1:-1].strip()
    rest = s  # then up to three trailing unit words, if a value remains: '18 dollars', '5 or more'
    for _ in range(3):
        m = _LAST_WORD.search(rest)
        if not m or m.group(1).lower() not in _UNITS: break
        rest = rest[:m.start()].rstrip()
    letter = re.search(r"(?<![\\A-Za-z])[A-Za-z]", rest)  # a variable: '2x m' keeps its m
    return named and named.group(1), rest if rest != s and not letter and _parse(rest) is not None else s

def _unwrap(s: str) -> str:
    """'\\text{\\textbf{5} cm}' -> '5 cm': every text wrapper, nested ones too, in one pass."""
    starts = list(_WRAPPER.finditer(s))
    if not starts: return s
    pairs = _brace_pairs(s)
    cut = {i for m in starts if m.end() in pairs
           for i in (*range(m.start(), m.end() + 1), pairs[m.end()])}
    return "".join(c for i, c in enumerate(s) if i not in cut)

def _strip_thousands(s: str) -> str:
    """'1,234,567' -> '1234567' if every comma sits in such a number ('45,135^\\circ' is a list)."""
    numbers = _THOUSANDS.findall(s)
    if not numbers or s.count(",") != sum(n.count(",") for n in numbers):
        return s
    return _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s)

# --- the toy task, the datasets and the prompts ---------------------------------------------------
def toy_problem(a: int, b: int) -> dict:
    """'47+38=' with a worked solution, right to left with carries: '7+8+0=15,4+3+1=8 #### 85'."""
    x, y, carry, steps = str(a)[::-1], str(b)[::-1], 0, []
    for i in range(max(len(x), len(y))):
        dx, dy = int(x[i]) if i < len(x) else 0, int(y[i]) if i < len(y) else 0
        steps.append(f"{dx}+{dy}+{carry}={dx + dy + carry}")
        carry = (dx + dy + carry) // 10
    return {"question": f"{a}+{b}=", "answer": str(a + b), "solution": f"{','.join(steps)} #### {a + b}"}

def make_toy_task(digits: int, n_test: int, seed: int, n_max: int = 20_000) -> tuple[list, list]:
    """Seeded, disjoint train and test splits of `digits`-digit additions."""
    lo, width, rng = 10 ** (digits - 1), 9 * 10 ** (digits - 1), random.Random(seed)
    if width * width <= sys.maxsize:
        picks = rng.sample(range(width * width), min(width * width, n_max))
    else:  # 10 digits and more: too many pairs for a range, and a repeat is all but impossible
        picks = list(dict.fromkeys(rng.randrange(width * width) for _ in range(n_max)))
    rows = [toy_problem(lo + i // width, lo + i % width) for i in picks]
    return rows[n_test:], rows[:n_test]

def _text(x) -> str:
    return "" if x is None else str(x)  # a missing cell (JSON null, empty) is no text

def _question_answer_row(r: dict) -> dict:
    """A local file's row, or GSM8K's, whose answer may be a worked solution ending in '#### 72'."""
    question, answer = _text(r["question"]), _text(r["answer"])
    if "####" in answer:
        return {"question": question, "answer": extract_answer(answer) or "", "solution": answer}
    return {"question": question, "answer": answer}

def _mmlu_row(r: dict) -> dict | None:
    """The options under the question, the letter as gold; anatomy left out (evalscope's 18 subjects)."""
    if r.get("subject") == "anatomy": return None
    options = "\n".join(f"{letter}) {choice}" for letter, choice in zip(string.ascii_uppercase, r["choices"]))
    return {"question": f"{r['question']}\n\n{options}\n\nAnswer with the letter of the correct option.",
            "answer": string.ascii_uppercase[int(r["answer"])]}

def _openr1_row(r: dict) -> dict | None:
    """Left out: proofs, placeholders ('proof', 'notfound') and answers the verifier cannot match."""
    answer = _text(r["answer"]).strip()
    if r.get("question_type") == "proof" or answer.lower() in ("", "proof", "notfound") or \
            verify(f"\\boxed{{{answer}}}", answer) < 1:
        return None
    return {"question": _text(r["problem"]), "answer": answer}

def _problem_row(r: dict) -> dict:
    return {"question": _text(r["problem"]), "answer": _text(r["answer"])}

# The hub datasets: id, config, split, the columns used, and how a row becomes {question, answer[,
# solution]} (None: left out). Ids, splits and columns are those of the dataset cards (README).
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
    """Rows {question, answer[, solution]} of a DATASETS name (the hub, or NAME=PATH: a local copy in
    its schema) or of a local .jsonl/.json/.parquet/.csv with question, answer columns. Duplicate
    questions and rows without an answer are left out."""
    try:
        import datasets  # here, so that the toy run works without it
    except ImportError:
        raise UserError(f"{spec} needs the `datasets` package: pip install -r requirements.txt") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become our one-line message
    name, _, path = spec.strip().partition("=")
    if name not in DATASETS and path:
        raise UserError(f"{spec}: unknown dataset {name!r}; NAME=PATH takes one of {', '.join(DATASETS)}")
    hub_id, config, hub_split, columns, to_row = DATASETS.get(name, (None, None, None, "question answer",
                                                                     _question_answer_row))
    path, columns = path or (None if name in DATASETS else name), columns.split()
    if path:
        ext = os.path.splitext(path)[1].lower()
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(ext)
        if not builder:
            raise UserError(f"{spec!r} is not a dataset ({', '.join(DATASETS)}) nor a .jsonl/.json/.parquet/.csv file")
        if not os.path.isfile(path):
            raise UserError(f"dataset file {path} does not exist")
        as_text = {"converters": {c: str for c in columns}, "keep_default_na": False} if builder == "csv" else {}
        try:  # a CSV's cells are read as the text written in them: '4' stays '4', an empty cell is ''
            table = datasets.load_dataset(builder, data_files=path, split="train", **as_text)
        except Exception as e:
            why = (str(e.__cause__ or e).strip().splitlines() or ["?"])[0][:200]  # some errors have no message
            raise UserError(f"could not read {path} as {ext[1:]}: {why}") from None
    else:
        hub_answers(f"{hub_id} ({split or hub_split})", f"pass a local copy as {name}=FILE (its schema) or a "
                                                          "file with question, answer columns")
        try:
            table = datasets.load_dataset(hub_id, config, split=split or hub_split)
        except Exception as e:
            raise UserError(f"could not load {hub_id} from the hub ({type(e).__name__}); with no network, pass a "
                            f"local copy as {name}=FILE (its schema) or a file with question, answer columns") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise UserError(f"{path or hub_id} has columns {table.column_names}; {name if path != name else 'a file'} "
                        f"needs {' and '.join(repr(c) for c in columns)} (missing: {', '.join(missing)})")
    rows = {}
    for row in map(to_row, table):
        if row and row["question"] and row["answer"]:
            rows.setdefault(row["question"], row)  # the first of duplicate questions
    return list(rows.values())

def build_prompts(tokenizer, questions: list[str], dataset: str, thinking: bool = False) -> list[list[int]]:
    """Each question's prompt, tokenized in one batch: the chat template when the tokenizer has one
    (`thinking`: Qwen3's enable_thinking); else the toy task's own format ('47+38=') on --dataset
    toy, or a plain prompt asking for \\boxed{}."""
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{q}\n{instruction}"}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=thinking) for q in questions]
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    if dataset != "toy":
        questions = [f"Question: {q}\n{instruction}\nAnswer:" for q in questions]
    return tokenizer(questions, verbose=False)["input_ids"] if questions else []

def build_prompt(tokenizer, question: str, dataset: str, thinking: bool = False) -> list[int]:
    return build_prompts(tokenizer, [question], dataset, thinking)[0]

def load_data(cfg: Config, tokenizer, policy) -> tuple[list, list, dict]:
    """(training rows, their prompts, the evaluation sets): GSM8K's own splits, any other dataset
    shuffled with --seed and --eval-size rows held out; every prompt must fit the context."""
    eval_only = cfg.steps == 0 and not cfg.sft_steps and cfg.eval_datasets  # no training set needed
    if eval_only:
        rows, held_out = [], []
    elif cfg.dataset == "toy":
        rows, held_out = make_toy_task(cfg.toy_digits, cfg.eval_size, cfg.seed)
    elif cfg.dataset == "gsm8k":
        rows, held_out = read_dataset("gsm8k", "train"), read_dataset("gsm8k", "test")[:cfg.eval_size]
    else:
        rows = read_dataset(cfg.dataset)
        if len(rows) <= cfg.eval_size:
            raise UserError(f"{cfg.dataset} has {len(rows)} rows; --eval-size {cfg.eval_size} would leave none "
                            "to train on (lower --eval-size)")
        random.Random(cfg.seed).shuffle(rows)
        rows, held_out = rows[cfg.eval_size:], rows[:cfg.eval_size]
    def prompts_of(some_rows):
        return build_prompts(tokenizer, [r["question"] for r in some_rows], cfg.dataset, cfg.thinking)
    if cfg.dataset.startswith("openr1"):  # the paper's filter: prompts of at most 1024 tokens
        rows, held_out = ([r for r, p in zip(x, prompts_of(x)) if len(p) <= 1024] for x in (rows, held_out))
    if not rows and not eval_only:
        raise UserError(f"no training problems left after holding out --eval-size {cfg.eval_size}: lower it")
    if cfg.sft_steps and not all("solution" in r for r in rows):
        raise UserError("--sft-steps needs worked solutions (the toy task, or GSM8K-style '... #### N' answers)")
    if cfg.dataset == "toy" and rows and rank_and_world_size()[0] == 0:
        longest = max(len(tokenizer(r["solution"])["input_ids"]) + 1 for r in rows[:1000])  # + the stop token
        if longest > cfg.max_new_tokens:
            print(f"egpo: a worked answer of --toy-digits {cfg.toy_digits} takes up to {longest} tokens, more than "
                  f"--max-new-tokens {cfg.max_new_tokens}: expect every reward to be 0")
    prompts = prompts_of(rows)
    evals, limit = eval_sets(cfg, tokenizer, held_out), context_length(policy.lm, tokenizer)
    for ps, new, name in [(prompts, cfg.max_new_tokens, "--max-new-tokens")] + \
            [(ps, cfg.eval_max_new_tokens, "--eval-max-new-tokens") for ps, _ in evals.values()]:
        if ps and max(map(len, ps)) + new > limit:
            raise UserError(f"a prompt is {max(map(len, ps))} tokens; with {name} {new} that exceeds the model's "
                            f"context of {limit}: use shorter questions or lower {name}")
    return rows, prompts, evals

def eval_sets(cfg: Config, tokenizer, held_out: list) -> dict:
    """{key prefix: (prompts, golds)}: the held-out split ('', the training set's format), or each of
    --eval-datasets in its own format ('NAME/': its name, the NAME of NAME=PATH, or a file's stem)."""
    sets = {"": (cfg.dataset, held_out)} if held_out and not cfg.eval_datasets else {}
    for spec in filter(None, (cfg.eval_datasets or "").split(",")):
        name, _, path = spec.strip().partition("=")
        name = name if path or name in DATASETS else os.path.splitext(os.path.basename(name))[0]
        if name + "/" in sets:
            raise UserError(f"--eval-datasets names {name} twice: rename a file, or give it as NAME=PATH")
        sets[name + "/"] = (spec, read_dataset(spec))
    return {prefix: (build_prompts(tokenizer, [r["question"] for r in rows], dataset, cfg.thinking),
                     [r["answer"] for r in rows]) for prefix, (dataset, rows) in sets.items()}

# --- models ---------------------------------------------------------------------------------------
TINY_VOCAB = ["<pad>", "<eos>", "<unk>"] + [c for c in string.printable if c not in "\t\r\x0b\x0c"]
TINY_CONFIG = dict(vocab_size=len(TINY_VOCAB), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
ALIASES = {name: "Qwen/" + name for name in """Qwen2.5-0.5B Qwen2.5-0.5B-Instruct Qwen2.5-1.5B Qwen2.5-1.5B-Instruct
Qwen2.5-3B Qwen2.5-3B-Instruct Qwen2.5-7B Qwen2.5-7B-Instruct Qwen2.5-Math-1.5B Qwen2.5-Math-7B
Qwen2.5-Math-1.5B-Instruct Qwen2.5-Math-7B-Instruct Qwen3-0.6B Qwen3-1.7B Qwen3-4B""".split()}

def build_tiny_model(seed: int):
    """A 0.14M-parameter Qwen2ForCausalLM (random init, TINY_CONFIG) and a character tokenizer, built here:
    Qwen2's own tokenizer class with a vocabulary of single characters and no merges, so that
    AutoTokenizer reloads a saved one as the same tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
    tokenizer = Qwen2Tokenizer(vocab=tiny_vocabulary(), merges=[], unk_token="<unk>", eos_token="<eos>",
                               pad_token="<pad>", model_max_length=256)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY_CONFIG, bos_token_id=None)), tokenizer

def tiny_vocabulary() -> dict[str, int]:
    """TINY_VOCAB's ids, each character written as a byte-level tokenizer writes it (' ' as 'Ġ', '\\n' as 'Ċ')."""
    return {chr(256 + ord(t)) if len(t) == 1 and ord(t) <= 32 else t: i for i, t in enumerate(TINY_VOCAB)}

def is_tiny(model: str) -> bool:
    """'tiny', or a checkpoint of it: a folder whose config and tokenizer are build_tiny_model's."""
    if model == "tiny": return True
    try:
        with open(os.path.join(model, "config.json")) as f, open(os.path.join(model, "tokenizer.json")) as g:
            config, vocab = json.load(f), json.load(g)["model"].get("vocab")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return vocab == tiny_vocabulary() and config.get("model_type") == "qwen2" and \
        all(config.get(k) == v for k, v in TINY_CONFIG.items())

def load_policy(cfg: Config, device: torch.device, path: str | None = None):
    """(Policy(model), tokenizer) of --model (or the folder `path`) on `device`: fp32 weights, left padding,
    and as stop tokens eos and the chat template's end of turn (a base model may write on past its eos)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    if cfg.model == "tiny" and path is None:
        model, tokenizer = build_tiny_model(cfg.seed)
    else:
        name = path or ALIASES.get(cfg.model, cfg.model)
        if not os.path.isdir(name):
            hub_answers(name, "pass a local path saved with save_pretrained, or run `python egpo.py` for the "
                              "offline demo")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        except Exception as e:  # whatever the library raises: a damaged file, an unknown id, no network
            if os.path.isdir(name):
                raise UserError(f"could not load the model in {name}: {type(e).__name__}: "
                                f"{(str(e).strip().splitlines() or ['?'])[0][:200]}") from None
            raise UserError(f"model {cfg.model!r} is not a local directory and could not be fetched from the hub "
                            f"({type(e).__name__}): pass a local path saved with save_pretrained, check the hub id "
                            "and the network, or run `python egpo.py` for the offline demo") from None
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    end_of_turn = end_of_turn_id(tokenizer) if tokenizer.chat_template else None
    eos_ids = sorted({tokenizer.eos_token_id, end_of_turn, *(eos if isinstance(eos, list) else [eos])} - {None})
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=model.generation_config.bos_token_id)
    if cfg.gradient_checkpointing:  # transformers < 5.24 names it gradient_checkpointing_enable
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return Policy(model).to(device), tokenizer

def hub_answers(what: str, otherwise: str):
    """Before a download from the hub: say what, and stop at once if the hub does not answer (the
    library would retry for about 25 s a file). HF_HUB_OFFLINE=1: the local cache only, no check."""
    from huggingface_hub import constants, get_session
    print(f"loading {what} from the hub or its local cache ...", flush=True)
    if constants.HF_HUB_OFFLINE: return
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as e:
        raise UserError(f"the hub ({constants.ENDPOINT}) does not answer ({type(e).__name__}): with no network, "
                        f"set HF_HUB_OFFLINE=1 to load {what} from the local cache, or {otherwise}") from None

def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn (Qwen's <|im_end|>, Llama 3's <|eot_id|>)."""
    marker = "EGPO-END-OF-ANSWER"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1="},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that cannot render a finished turn: no extra stop token
        return None
    after = tokenizer(text.split(marker)[-1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None

def reference_model(policy, tokenizer, cfg: Config, device, resumed: dict | None):
    """The frozen initial policy of the KL term, saved once in the run folder for a resumed run."""
    path = os.path.join(cfg.out, "reference")
    ref = load_policy(cfg, device, path)[0] if resumed else copy.deepcopy(policy)
    if rank_and_world_size()[0] == 0 and not resumed:
        ref.lm.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return ref.eval().requires_grad_(False)

def kv_cache(config):
    """A DynamicCache that stores the keys in the values' dtype: under bf16 autocast the rotary
    embedding makes them fp32 (1.5x the memory), and attention casts them to bf16 anyway."""
    return kv_cache_type()(config=config)

@functools.cache
def kv_cache_type() -> type:
    from transformers import DynamicCache

    class KVCache(DynamicCache):  # a subclass, not a patched method: no reference cycle, so a rollout's
        def update(self, keys, values, *args, **kwargs):  # cache is freed as soon as the rollout ends
            return super().update(keys.to(values.dtype), values, *args, **kwargs)
    return KVCache

def autocast(device: torch.device, bf16: bool):
    """bf16 autocast over fp32 weights on CUDA (TRL's bf16=True): a 1e-6 update is below bf16's resolution."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()

def context_length(model, tokenizer) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    return n or min(tokenizer.model_max_length, 10 ** 7)  # some tokenizers say 1e30 for "unknown"

# --- the warm-up, the evaluation and the step metrics ---------------------------------------------
def sft_warmup(policy: Policy, tokenizer, rows: list, prompts: list, cfg: Config, rng: random.Random) -> int:
    """Supervised warm-up on worked solutions (prompts masked), so that RL starts from a model that gets
    some answers right, until greedy accuracy on 64 training problems reaches --sft-target (checked every
    10 steps; docs/design.md says why a target). Returns the steps taken."""
    device, optimizer = policy.lm.device, torch.optim.AdamW(policy.parameters(), lr=cfg.sft_lr)
    check = rng.sample(range(len(rows)), min(64, len(rows)))
    policy.train()
    for step in tqdm(range(1, cfg.sft_steps + 1), desc="warm-up (SFT)", leave=False,
                     disable=rank_and_world_size()[0] > 0):
        seqs, labels = [], []
        for i in rng.sample(range(len(rows)), min(cfg.sft_batch_size, len(rows))):
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
            if batch["rewards"].mean() >= cfg.sft_target: return step
    return cfg.sft_steps

def pad_right(rows: list[list[int]], value: int, device) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], device=device)

def evaluate_all(policy, tokenizer, evals: dict, cfg: Config) -> dict:
    """evaluate() on each evaluation set ({key prefix: (prompts, golds)}), the keys prefixed."""
    return {k: v for prefix, (prompts, golds) in evals.items()
            for k, v in evaluate(policy, tokenizer, prompts, golds, cfg, prefix).items()}

@torch.no_grad()
def evaluate(policy, tokenizer, prompts: list, golds: list, cfg: Config, prefix: str = "") -> dict:
    """The paper's protocol (Section 4.1): a greedy answer and k = --eval-samples sampled ones per problem
    (noise seeded by --seed). Returns, keys prefixed by `prefix`: greedy accuracy, pass@1 with its standard
    error, the share cut off, and on the samples the AUROC of -H and mean H, all, right, wrong (Section 4.4)."""
    rank, world_size = rank_and_world_size()
    k = cfg.eval_samples
    ecfg = dataclasses.replace(cfg, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, top_k=cfg.eval_top_k,
                               max_new_tokens=cfg.eval_max_new_tokens)
    noise = torch.rand(len(prompts) * k, ecfg.max_new_tokens, generator=torch.Generator().manual_seed(cfg.seed + 1))
    lo, hi = rank * len(prompts) // world_size, (rank + 1) * len(prompts) // world_size
    chunk = max(1, cfg.prompts_per_step // world_size * cfg.group_size // k)  # problems per rollout, as training
    empty = torch.zeros(0, device=next(policy.parameters()).device)
    parts = {key: [empty] for key in ("greedy", "sampled", "H", "truncated")}
    with full_weights(policy, cfg.bf16) as sampler:
        for i in tqdm(range(lo, hi, chunk), desc=f"eval {prefix or 'held-out'}", leave=False, disable=rank > 0):
            p, g = prompts[i:min(i + chunk, hi)], golds[i:min(i + chunk, hi)]
            parts["greedy"].append(rollout(sampler, tokenizer, p, g, 1, ecfg, greedy=True)["rewards"])
            batch = rollout(sampler, tokenizer, p, g, k, ecfg, noise=noise[i * k:(i + len(p)) * k])
            parts["sampled"].append(batch["rewards"])
            parts["H"].append(sequence_entropy(batch["logprobs"], batch["entropy_mask"]))
            parts["truncated"].append(batch["truncated"].float())
    greedy, sampled, entropy, truncated = all_gather(*(torch.cat(parts[key]) for key in parts))
    pass1, valid, correct = sampled.view(-1, k).mean(1), ~entropy.isnan(), sampled > 0           # (problems,)
    metrics = {"eval_acc": greedy.mean(), "eval_acc_sampled": pass1.mean(),
               "eval_acc_sampled_se": pass1.std() / len(pass1) ** 0.5 if len(pass1) > 1 else torch.nan,
               "eval_truncated": truncated.mean(), "eval_auroc": auroc(-entropy[valid], sampled[valid]),
               "eval_entropy": entropy.nanmean(), "eval_entropy_correct": entropy[correct].nanmean(),
               "eval_entropy_incorrect": entropy[~correct].nanmean()}  # NaN if a class is empty
    return {prefix + key: float(value) for key, value in metrics.items()}

def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(a random positive scores above a random negative), ties 1/2 (Mann-Whitney U); NaN if a class is absent."""
    pos = labels > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0: return float("nan")
    _, inverse, counts = scores.double().unique(return_inverse=True, return_counts=True)
    rank = (counts.cumsum(0) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties given their mean rank
    return ((rank[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()

def calibration_metrics(rewards, entropy, adv, adv_tilde, group_size: int) -> dict:
    """Accuracy, H by correctness, w = A~ / A in mixed groups, NSR's mean A~, the group kinds, the
    four quadrants (confident: H below the group's mean) and the AUROC of -H."""
    r, h, nan = rewards.float().view(-1, group_size), entropy.float().view(-1, group_size), float("nan")
    mixed, all_wrong = r.std(1) > 0, r.amax(1) <= 0
    confident = (h < h.nanmean(1, keepdim=True)).view(-1)
    correct, valid = rewards.view(-1) > 0, ~entropy.isnan()
    in_mixed = mixed.repeat_interleave(group_size) & (adv != 0)
    w, nsr = adv_tilde[in_mixed] / adv[in_mixed], adv_tilde[all_wrong.repeat_interleave(group_size)]
    return {
        "reward_mean": rewards.float().mean().item(), "acc": correct.float().mean().item(),
        "entropy_mean": entropy.nanmean().item(),
        "entropy_correct": entropy[correct].nanmean().item(), "entropy_incorrect": entropy[~correct].nanmean().item(),
        "weight_mean": w.mean().item(), "weight_min": w.min().item() if len(w) else nan,  # mean: NaN if empty,
        "weight_max": w.max().item() if len(w) else nan, "nsr_adv_mean": nsr.mean().item(),  # min, max: an error
        "groups_all_correct": int((r.amin(1) > 0).sum()), "groups_all_wrong": int(all_wrong.sum()),
        "groups_mixed": int(mixed.sum()), "confident_correct": int((confident & correct).sum()),
        "fragile_correct": int((~confident & correct & valid).sum()),
        "overconfident_wrong": int((confident & ~correct).sum()),
        "exploratory_wrong": int((~confident & ~correct & valid).sum()),
        "auroc_confidence": auroc(-entropy[valid], rewards[valid]),
    }

def step_metrics(batch: dict, entropy, adv, adv_tilde, logs: dict, time_update: float, cfg: Config) -> dict:
    """A step's metrics over all processes; with --log-completions, every response with r, H, A, A~."""
    device = batch["rewards"].device
    logs = {**logs, **{k: float(all_reduce(logs[k], device)) for k in ("loss", "kl", "clip_frac")}}
    if device.type == "cuda":
        logs["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if cfg.log_completions:  # every process's rows, in order
        columns = zip(batch["prompts"], batch["texts"], *(x.tolist() for x in (batch["rewards"], entropy, adv,
                                                                                adv_tilde)))
        rows = [{"prompt": p, "completion": c, "reward": r, "entropy": h, "advantage": a, "egpo_advantage": a_tilde}
                for p, c, r, h, a, a_tilde in columns]
        logs["completions"] = [{"group": i // cfg.group_size, **row} for i, row in enumerate(all_gather_objects(rows))]
    n_tokens = float(all_reduce(batch["response_mask"].sum(), device))
    rewards, entropy, adv, adv_tilde, truncated = all_gather(batch["rewards"], entropy, adv, adv_tilde,
                                                             batch["truncated"])
    return {**calibration_metrics(rewards, entropy, adv, adv_tilde, cfg.group_size), **logs,
            "completion_len": n_tokens / len(rewards), "truncated_frac": truncated.float().mean().item(),
            "groups_sampled": int(all_reduce(batch["groups_sampled"], device)), "time_sample": batch["time_sample"],
            "time_update": time_update, "tokens_per_s": n_tokens / batch["time_sample"]}

# --- several processes (torchrun): data parallel (DDP) or sharded (FSDP2) -------------------------
def rank_and_world_size() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def all_reduce(x, device, op: str = "sum") -> torch.Tensor:
    """x summed (or its max) over the processes, as a float64 tensor; x itself with one process."""
    x = torch.as_tensor(x, dtype=torch.float64, device=device)
    if rank_and_world_size()[1] > 1:
        torch.distributed.all_reduce(x, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return x

def all_gather_objects(rows: list) -> list:
    """The lists of all processes, concatenated, rank 0's first: what one process would hold."""
    if rank_and_world_size()[1] == 1: return rows
    parts = [None] * rank_and_world_size()[1]
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part]

def all_gather(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor concatenated over the processes, rank 0's rows first."""
    if rank_and_world_size()[1] == 1: return list(tensors)
    parts = all_gather_objects([[x.cpu() for x in tensors]])
    return [torch.cat(xs).to(x.device) for xs, x in zip(zip(*parts), tensors)]

def set_up(cfg: Config) -> tuple[torch.device, dict | None]:
    """The run's device (under torchrun, after joining the process group) and, with --resume, the
    checkpoint's state (read before anything changes); one CPU thread for the tiny model (the same
    sums, so the same numbers, on any CPU), and torch's seed."""
    device = init_distributed(cfg)
    resumed = resume_point(cfg, rank_and_world_size()[1])
    if is_tiny(resumed["path"] if resumed else cfg.model) and device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    return device, resumed

def prompt_draws(cfg: Config, rows: list, prompts: list, rng: random.Random, noise_rng):
    """A function that draws a step's B prompts and their sampling noise, the same on every process,
    and returns this process's share: (prompts, golds, noise) of B / N groups."""
    rank, world_size = rank_and_world_size()
    per_process = cfg.prompts_per_step // world_size

    def draw():
        picks = [rng.randrange(len(rows)) for _ in range(cfg.prompts_per_step)]
        noise = torch.rand(cfg.prompts_per_step * cfg.group_size, cfg.max_new_tokens, generator=noise_rng)
        lo, hi = rank * per_process, (rank + 1) * per_process
        return ([prompts[i] for i in picks[lo:hi]], [rows[i]["answer"] for i in picks[lo:hi]],
                noise[lo * cfg.group_size:hi * cfg.group_size])
    return draw

def loss_weights(mask: torch.Tensor, chunks: list[slice], cfg: Config) -> tuple[list[float], list[float]]:
    """Each micro-batch's loss weight: its share of the tokens (token-mean) or responses of the batch
    over all processes, times their number (DDP and FSDP average gradients), so that the accumulated
    gradient is the whole batch's on one process or N. And its share of the tokens."""
    tokens = [float(mask[s].sum()) for s in chunks]
    rows = [float(s.stop - s.start) for s in chunks] if cfg.loss_agg == "seq-mean-token-mean" else tokens
    total_rows, total_tokens = (float(all_reduce(sum(x), mask.device)) for x in (rows, tokens))
    return [x * rank_and_world_size()[1] / total_rows for x in rows], [x / total_tokens for x in tokens]

def init_distributed(cfg: Config) -> torch.device:
    """Under torchrun: join the process group, a GPU per process (NCCL) or CPU processes (gloo)."""
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
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this machine, "
                        f"which has {torch.cuda.device_count()} GPU(s): one process a GPU (--nproc_per_node "
                        f"{torch.cuda.device_count()})")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",  # rank 0 may write a big
                                         timeout=datetime.timedelta(hours=1))  # checkpoint while the others wait
    return device

def parallelize(policy: Policy, cfg: Config):
    """Under torchrun: rank 0's weights everywhere, then DDP (a copy per process) or, with --fsdp,
    FSDP2 (weights, gradients and AdamW's state sharded; a decoder layer gathered while it runs)."""
    if rank_and_world_size()[1] == 1: return policy
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

def unwrap(policy) -> Policy:
    return policy.module if isinstance(policy, torch.nn.parallel.DistributedDataParallel) else policy

@contextlib.contextmanager
def gradient_sync(policy, sync: bool):
    """Only the micro-batch with sync=True reduces gradients (DDP: no_sync over the forward too;
    FSDP: no reduce-scatter)."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(policy, FSDPModule):
        policy.set_requires_gradient_sync(sync)
    ddp = isinstance(policy, torch.nn.parallel.DistributedDataParallel)
    with policy.no_sync() if ddp and not sync else contextlib.nullcontext():
        yield

@contextlib.contextmanager
def full_weights(policy, bf16: bool = False):
    """The module to sample with. DDP: the module inside (its forward would sync buffers at every
    token). FSDP: all weights gathered once for the whole generation (no decode step waits); with
    --bf16 into a bf16 copy (bf16_copy), which halves what is gathered."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(policy, FSDPModule):
        yield unwrap(policy)
        return
    if bf16:
        yield bf16_copy(policy)
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

def bf16_copy(policy: Policy) -> Policy:
    """A sharded Policy's weights, each shard cast to bf16 and then gathered, in a new model: 2 bytes a
    parameter instead of 4, while the fp32 shards (and so the update) stay as they are. Its buffers
    (the rotary frequencies) keep their dtype, and its output layer is gathered in fp32, in which
    Policy computes the logits (untied from the embedding: not cast at every token)."""
    from torch.distributed.tensor import DTensor
    with torch.device("meta"):  # no memory yet
        lm = type(policy.lm)(policy.lm.config)
    for p in lm.parameters():
        p.data = p.data.to(torch.bfloat16)
    lm.to_empty(device=next(policy.parameters()).device)  # not initialised: every tensor is set below
    lm.tie_weights()  # to_empty() made new tensors: a tied output layer is the embedding again
    lm.generation_config = policy.lm.generation_config
    with torch.no_grad():
        for name, p in policy.lm.named_parameters():
            x = p.detach()
            if isinstance(x, DTensor):
                x = DTensor.from_local(x.to_local().to(torch.bfloat16), x.device_mesh, x.placements, shape=x.shape,
                                       stride=x.stride()).full_tensor()
            lm.get_parameter(name).copy_(x)
        for name, x in policy.lm.named_buffers():
            lm.get_buffer(name).copy_(x)
        head = policy.lm.get_output_embeddings().weight.detach()  # gathered in fp32
        head = head.full_tensor() if isinstance(head, DTensor) else head.clone()
    lm.get_output_embeddings().weight = torch.nn.Parameter(head, requires_grad=False)
    return Policy(lm).eval()

# --- checkpoints, and a run that stops and resumes ------------------------------------------------
def generator_states(rng: random.Random, noise_rng: torch.Generator, device) -> dict:
    """Every random generator a run draws from: Python's (the prompts), the noise's, torch's."""
    return {"python": rng.getstate(), "noise": noise_rng.get_state(), "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}

def save_checkpoint(policy, tokenizer, optimizer, generators: dict, summary: dict, cfg: Config, run_id: str):
    """checkpoint/: model and tokenizer (save_pretrained), AdamW's state (optimizer.pt, or each
    FSDP shard: optimizer-rank<r>.pt), every process's generators (rng.pt) and, last,
    trainer_state.json (step, summary so far, the run's id), which marks it complete. It is written as
    checkpoint.new/ and then swapped in: a kill at any moment leaves the previous one whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    rank, world_size = rank_and_world_size()
    barrier = torch.distributed.barrier if world_size > 1 else lambda: None
    final, new, old = (os.path.join(cfg.out, name) for name in ("checkpoint", "checkpoint.new", "checkpoint.old"))
    weights = None
    if isinstance(policy, FSDPModule):  # gathered to rank 0
        weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        weights = {k.removeprefix("lm."): v for k, v in weights.items()}
    generators = all_gather_objects([generators])
    if rank == 0:
        shutil.rmtree(new, ignore_errors=True)
        unwrap(policy).lm.save_pretrained(new, state_dict=weights)
        tokenizer.save_pretrained(new)
    barrier()
    if cfg.fsdp or rank == 0:  # tensors and plain values only, for torch.load(weights_only=True)
        state = optimizer.state_dict()
        state["state"] = {i: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in moments.items()}
                          for i, moments in state["state"].items()}  # FSDP: this process's shard
        torch.save(state, os.path.join(new, f"optimizer-rank{rank}.pt" if cfg.fsdp else "optimizer.pt"))
    barrier()
    if rank == 0:
        torch.save(generators, os.path.join(new, "rng.pt"))
        with open(os.path.join(new, "trainer_state.json"), "w") as f:
            f.write(to_json({"step": summary["steps_done"], "run_id": run_id, "algo": cfg.algo, "model": cfg.model,
                             "world_size": world_size, "summary": summary}, indent=2))
        if os.path.isdir(final):  # a checkpoint.old/ left by a kill is older than checkpoint/
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()

def last_checkpoint(run: str) -> dict:
    """trainer_state.json of the checkpoint to resume from, with its 'path': checkpoint/, or after
    a kill between save_checkpoint's renames checkpoint.old/ (never checkpoint.new/)."""
    for path in (os.path.join(run, "checkpoint"), os.path.join(run, "checkpoint.old")):
        if os.path.isdir(path):
            try:  # NaN was written as null
                with open(os.path.join(path, "trainer_state.json")) as f:
                    state = json.load(f, object_hook=lambda d: {k: math.nan if v is None else v for k, v in d.items()})
                return {**state, "path": path}
            except (OSError, ValueError):
                raise UserError(f"{path} has no readable trainer_state.json (a model without its training state, or "
                                f"a write cut off): nothing to resume; start a new run with --model {path}") from None
    raise UserError(f"{run} has no checkpoint to resume from: the run stopped before writing one "
                    "(--save-every N writes one every N steps)")

def resume_point(cfg: Config, world_size: int) -> dict | None:
    """--resume: the checkpoint's state, optimizer and this process's generators, read (tensors and
    plain values only, weights_only=True) before anything in the folder changes."""
    if not cfg.resume: return None
    resumed, rank = last_checkpoint(cfg.resume), rank_and_world_size()[0]
    with open(os.path.join(cfg.resume, "config.json")) as f:
        run_id = json.load(f).get("run_id")
    if resumed.get("run_id") != run_id or run_id is None:  # the checkpoint proves it is this run's
        raise UserError(f"{resumed['path']} is not the checkpoint of the run in {cfg.resume}/config.json (run id "
                        f"{resumed.get('run_id')}, not {run_id}): it cannot be resumed; to train its weights "
                        f"further, start a new run with --model {resumed['path']}")
    if cfg.beta > 0 and not os.path.isfile(os.path.join(cfg.resume, "reference", "config.json")):
        raise UserError(f"{cfg.resume}/reference/, the frozen initial policy of --beta {cfg.beta}, is missing: "
                        "the run cannot be resumed without it")
    if resumed["world_size"] != world_size and cfg.fsdp:  # DDP's processes all hold the same state
        raise UserError(f"{cfg.resume} ran on {resumed['world_size']} processes with --fsdp, whose optimizer "
                        f"state is sharded by process: resume it on as many (torchrun --nproc_per_node "
                        f"{resumed['world_size']})")
    if cfg.steps <= resumed["step"]:
        raise UserError(f"{cfg.resume} has done {resumed['step']} steps of its --steps {cfg.steps}: give --steps "
                        "N with N larger to train on")
    files = (f"optimizer-rank{rank}.pt" if cfg.fsdp else "optimizer.pt", "rng.pt")
    try:
        resumed["optimizer"], generators = (torch.load(os.path.join(resumed["path"], f), map_location="cpu",
                                                       weights_only=True) for f in files)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise UserError(f"{resumed['path']}: {' or '.join(files)} is missing, damaged or holds more than tensors "
                        f"and plain values ({type(e).__name__}): not loaded") from None
    # every process draws the same prompts and noise (and keeps its share): rank 0's serve any number
    resumed["generators"] = generators[rank] if len(generators) == world_size else generators[0]
    for key in ("interrupted", "checkpoint_error", "last_checkpoint"):
        resumed["summary"].pop(key, None)
    return resumed

def restore_training_state(optimizer, rng, noise_rng, resumed: dict, device):
    """AdamW's state (an FSDP shard back into its parameter's layout) and the generators."""
    from torch.distributed.tensor import DTensor
    state, params = resumed.pop("optimizer"), [p for group in optimizer.param_groups for p in group["params"]]
    for i, moments in state["state"].items():
        p = params[i]
        for k, v in moments.items():
            if isinstance(p, DTensor) and k != "step":
                moments[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                                stride=p.stride())
    optimizer.load_state_dict(state)
    generators = resumed["generators"]
    rng.setstate(generators["python"])
    noise_rng.set_state(generators["noise"])
    torch.set_rng_state(generators["torch"])
    if "cuda" in generators:
        torch.cuda.set_rng_state(generators["cuda"], device)

RUN_FILES = ("config.json", "metrics.jsonl", "completions.jsonl", "summary.json", "checkpoint", "checkpoint.new",
             "checkpoint.old", "reference")  # what a run writes in its folder: --overwrite deletes these

class Run:
    """All of a run but the algorithm: its folder and config.json, metrics.jsonl and completions.jsonl,
    evaluations and checkpoints between steps, Ctrl-C and SIGTERM, summary.json. Before the RL steps
    Ctrl-C or SIGTERM stops at once; from the first step on, after the current step and its checkpoint,
    and the last checkpoint is written through one more (Ctrl-C twice: at once, without a checkpoint).
    A crash or a stop leaves the metrics, summary.json and the last checkpoint."""

    def __init__(self, cfg: Config, resumed: dict | None, rng, noise_rng, device):
        self.cfg, self.resumed, self.rng, self.noise_rng, self.device = cfg, resumed, rng, noise_rng, device
        self.summary = resumed["summary"] if resumed else {"steps_done": 0}
        if "after" in self.summary:  # the step of the evaluation "after", written where it is not the last one
            self.summary.setdefault("after_step", self.summary["steps_done"])
        self.saved = self.summary["steps_done"] if resumed else None  # the step in checkpoint/
        self.consistent = False  # True between steps: the state is one a checkpoint can hold
        self.phase, self.signals, self.rank0 = "setup", [], rank_and_world_size()[0] == 0

    def __enter__(self):
        self.run_id = start_run(self.cfg, self.resumed)
        self.handlers = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.metrics_file, self.completions_file = open_logs(self.cfg, self.resumed)
        return self

    def on_signal(self, signum, _):
        twice = signum == signal.SIGINT and signal.SIGINT in self.signals
        self.signals.append(signum)
        if self.phase == "setup" or twice:  # at once
            raise KeyboardInterrupt
        if len(self.signals) == 1 and self.rank0:
            then = "after this step" if self.phase == "steps" else "once the last checkpoint is written"
            again = "again" if signum == signal.SIGINT else "twice"
            print(f"\n{signal.Signals(signum).name}: stopping {then} (Ctrl-C {again}: at once, without a "
                  "checkpoint)", file=sys.stderr)

    def start(self, policy, tokenizer, optimizer, evals: dict):
        """Before the first RL step: a resumed run's optimizer and generators, or the evaluation "before"."""
        self.policy, self.tokenizer, self.optimizer = policy, tokenizer, optimizer
        self.evaluate = evals and (lambda: evaluate_all(policy, tokenizer, evals, self.cfg))
        if self.resumed:
            restore_training_state(optimizer, self.rng, self.noise_rng, self.resumed, self.device)
        elif evals:
            self.summary["before"] = self.evaluate()
            self.write_summary()
        self.consistent, self.phase = True, "steps"

    def steps(self):
        done, total = self.summary["steps_done"], self.cfg.steps
        self.bar = tqdm(range(done + 1, total + 1), desc=self.cfg.algo, disable=not self.rank0, initial=done,
                        total=total)
        for step in self.bar:
            self.consistent = False
            if self.device.type == "cuda":  # gpu_peak_mem_gib: this step's peak
                torch.cuda.reset_peak_memory_stats(self.device)
            yield step

    def end_step(self, step: int, metrics: dict):
        """The step's evaluation (every --eval-every steps and the last), logs and checkpoint (every
        --save-every steps); then, after a Ctrl-C or SIGTERM on any process, the end of the run."""
        cfg, completions = self.cfg, metrics.pop("completions", [])
        if self.evaluate and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            metrics.update(self.evaluate())
            self.summary["after"] = {k: metrics[k] for k in self.summary["before"]}
            self.summary["after_step"] = step
        self.metrics_file.write(to_json({"step": step, **metrics}) + "\n")
        self.completions_file.writelines(to_json({"step": step, **row}) + "\n" for row in completions)
        for f in (self.metrics_file, self.completions_file):
            f.flush()
        self.summary["steps_done"], self.consistent = step, True
        self.bar.set_postfix(acc=f"{metrics['acc']:.2f}", H=f"{metrics['entropy_mean']:.2f}",
                             auroc=f"{metrics['auroc_confidence']:.2f}")
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()
        if step < cfg.steps and all_reduce(len(self.signals), self.device) > 0:  # all stop after the same step
            raise KeyboardInterrupt

    def save(self):
        """checkpoint/ of this step; if that fails, summary.json says so and names the checkpoint left."""
        try:
            save_checkpoint(self.policy, self.tokenizer, self.optimizer,
                            generator_states(self.rng, self.noise_rng, self.device), self.written_summary(),
                            self.cfg, self.run_id)
            self.saved = self.summary["steps_done"]
        except BaseException as e:
            self.saved = "failed"
            self.summary["checkpoint_error"] = f"step {self.summary['steps_done']}: {type(e).__name__} {e}".strip()
            try:
                self.summary["last_checkpoint"] = {"path": (last := last_checkpoint(self.cfg.out))["path"],
                                                   "step": last["step"]}
            except UserError:
                self.summary["last_checkpoint"] = None
            if isinstance(e, KeyboardInterrupt): raise
            left = self.summary["last_checkpoint"]
            raise UserError(f"could not write {self.cfg.out}/checkpoint/ ({self.summary['checkpoint_error']}); "
                            + (f"{left['path']} holds step {left['step']}" if left else "no checkpoint exists")
                            ) from None

    def __exit__(self, kind, error, traceback):
        interrupted = kind is KeyboardInterrupt
        try:
            trained = self.summary["steps_done"] or "sft_steps_done" in self.summary  # an evaluation alone: no model
            if interrupted:
                self.summary["interrupted"] = True
                if self.rank0:
                    print(f"\ninterrupted after {self.summary['steps_done']} RL steps", file=sys.stderr)
            if trained and self.consistent and self.saved not in (self.summary["steps_done"], "failed") \
                    and self.signals.count(signal.SIGINT) < 2:
                self.phase = "saving"
                self.save()
        except KeyboardInterrupt:  # Ctrl-C twice while the last checkpoint was written
            interrupted = self.summary["interrupted"] = True
        finally:
            self.write_summary()
            for sig, handler in self.handlers.items():
                signal.signal(sig, handler)
            self.metrics_file.close()
            self.completions_file.close()
        return interrupted  # handled: train() returns the summary, and main() exits with 130

    def written_summary(self) -> dict:
        """summary.json: "after_step" only where the evaluation "after" is not of the last step done."""
        return {k: v for k, v in self.summary.items()
                if k != "after_step" or v != self.summary["steps_done"]}

    def write_summary(self):
        if self.rank0:
            write_json(os.path.join(self.cfg.out, "summary.json"), self.written_summary())

def open_logs(cfg: Config, resumed: dict | None):
    """metrics.jsonl and completions.jsonl, open to append (rank 0; os.devnull elsewhere). A resumed
    run drops their lines after its checkpoint (and a line cut off by a kill)."""
    rank0 = rank_and_world_size()[0] == 0
    paths = [os.path.join(cfg.out, name) if rank0 and (name == "metrics.jsonl" or cfg.log_completions)
             else os.devnull for name in ("metrics.jsonl", "completions.jsonl")]
    for path in paths if resumed else []:
        if path != os.devnull and os.path.isfile(path):
            with open(path) as f:
                kept = [line.rstrip("\n") + "\n" for line in f if _step_of(line) <= resumed["step"]]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
    return [open(path, "a" if resumed else "w") for path in paths]

def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut off by a kill
        return math.inf

# --- the command line: checks of the flags, files written, main -----------------------------------
TIME_KEYS = ("time_sample", "time_update", "tokens_per_s")  # the only metrics that vary between identical runs
RESUMABLE = ("steps", "save_every")  # the flags a resumed run may change: they change none of its numbers

class UserError(Exception):
    """Bad input: main() prints it as one line and exits with code 2."""

def in_range(x, check: str) -> bool:
    """x finite, and within a range written as '>= 1', '> 0', '(0, 1]' or '[0, 1)'."""
    if not math.isfinite(x): return False
    if check.startswith(">"):
        bound = float(check.lstrip(">= "))
        return x >= bound if check.startswith(">=") else x > bound
    low, high = (float(v) for v in check[1:-1].split(","))
    return (low <= x if check[0] == "[" else low < x) and (x <= high if check[-1] == "]" else x < high)

def auto_value(value, cfg: Config):
    """An AUTO value: itself, or flag x's value for '--x', or N times it for 'N x --x'."""
    if not (isinstance(value, str) and "--" in value): return value
    times, _, name = value.partition("--")
    return int(times.strip(" x") or 1) * getattr(cfg, name.replace("-", "_"))

def resolve(cfg: Config) -> Config:
    """Fill the auto defaults in and check every value a user can get wrong, before any model loads."""
    tiny = is_tiny(cfg.model)
    if cfg.sft_steps is None and (cfg.model != "tiny" or cfg.dataset not in (None, "toy")):
        cfg.sft_steps = 0  # a checkpoint of the tiny model is warmed up already, and only the toy has solutions
    for name, values in AUTO.items():  # in AUTO's order: a flag named by a value comes before it
        if getattr(cfg, name) is None:
            setattr(cfg, name, auto_value(values[0 if tiny else 1], cfg))
    if cfg.device == "auto":  # the tiny demo is as fast on a CPU, and its README numbers are CPU numbers
        cfg.device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    if cfg.bf16 and cfg.device != "cuda":
        raise UserError(f"--bf16 autocasts on CUDA only, and this run is on --device {cfg.device}: drop --bf16")
    if cfg.bf16 is None:  # config.json records what is in effect
        cfg.bf16 = cfg.device == "cuda" and not tiny and torch.cuda.is_bf16_supported(including_emulation=False)
        if cfg.device == "cuda" and not tiny and not cfg.bf16:  # a T4 or V100: bf16 would be emulated, slowly
            print("egpo: this GPU has no native bf16: training in fp32 (--bf16 forces bf16 autocast)")
    if tiny and cfg.dataset != "toy" and not cfg.sft_steps and not cfg.resume:
        print(f"egpo: the tiny model knows only the toy task ('47+38=' -> '...#### 85'); on {cfg.dataset} it gets "
              "no warm-up and prompts it never saw ('Question: ... Answer:'), so expect 0% reward. To let it learn "
              "a file, give the file worked solutions ('... #### 42') and pass --sft-steps N")
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
    for f in dataclasses.fields(Config):
        value, check = getattr(cfg, f.name), f.metadata["check"]
        if check and value is not None and not in_range(value, check):
            name = "--" + f.name.replace("_", "-")
            raise UserError(f"{name} must be {'in ' * (check[0] in '([')}{check} (got {value}): {f.metadata['help']}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here: use --device cpu (or auto)")
    if not cfg.resume and int(os.environ.get("RANK", 0)) == 0:  # under torchrun rank 0 owns the folder
        check_run_folder(cfg)
    return cfg

def check_run_folder(cfg: Config):
    """A new run's --out (by default a new runs/<time>-<algo>-<model>): a folder that holds no run
    (or, with --overwrite, one whose run may go) and that can be created. Nothing is written yet."""
    if cfg.out is None:
        name = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.algo}-" + os.path.basename(
            cfg.model.rstrip("/")))
        cfg.out = next(out for i in range(1, 10 ** 6) if not os.path.exists(out := name + f"-{i}" * (i > 1)))
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out, f))]
    if held and not cfg.overwrite:
        raise UserError(f"--out {cfg.out} holds a run already ({', '.join(held)}): continue it with --resume "
                        f"{cfg.out}, choose another --out, or replace it with --overwrite")
    parent = cfg.out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"--out {cfg.out}: {parent} is not a folder this run can write in: choose another --out")

def parse_args(argv=None) -> Config:
    """The command line as a Config; with --resume RUN, RUN's config.json, where only RESUMABLE
    flags may take another value."""
    parser = argparse.ArgumentParser(prog="egpo.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     argument_default=argparse.SUPPRESS)  # a flag not given is left out
    for f in dataclasses.fields(Config):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.name in AUTO:  # [tiny / real models], or one value for both
            help += f" [{' / '.join(dict.fromkeys('all' if v is None else str(v) for v in AUTO[f.name]))}]"
        if f.type is bool:  # --flag; an auto (None) default also gets --no-flag
            parser.add_argument(name, action="store_true" if f.default is False else argparse.BooleanOptionalAction,
                                help=help)
        else:
            help += "" if f.default is None else f" (default: {f.default})"
            parser.add_argument(name, type=f.type, choices=f.metadata["choices"], help=help)
    given = vars(parser.parse_args(argv))
    if not given.get("resume"): return Config(**given)
    if given.keys() & {"model", "out", "overwrite"}:
        raise UserError(f"--{min(given.keys() & {'model', 'out', 'overwrite'})}: --resume continues the run's own "
                        "model in its own folder; drop it")
    run = given["resume"]
    if os.path.isfile(os.path.join(run, "trainer_state.json")):  # RUN/checkpoint: the run is RUN
        run = os.path.dirname(os.path.normpath(run)) or "."
    try:
        with open(os.path.join(run, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"--resume {run}: not a run folder (no readable config.json); pass the --out "
                        "folder of a run") from None
    if given.get("device") == "auto":  # the run's device, as auto chose it then
        given["device"] = saved.get("device")
    changed = sorted(k for k in given.keys() - {"resume", *RESUMABLE} if given[k] != saved.get(k))
    if changed:
        name, k = "--" + changed[0].replace("_", "-"), changed[0]
        raise UserError(f"{name} {given[k]} differs from the run's {name} {saved.get(k)}: a resumed run "
                        "keeps its config; only --steps and --save-every may change")
    kept = {f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved}
    return Config(**{**kept, **{k: given[k] for k in RESUMABLE if k in given}, "resume": run, "out": run,
                     "overwrite": False})

def to_json(x, **kwargs) -> str:
    """json.dumps with every NaN or infinity written as null: NaN is not JSON (jq, JavaScript)."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x): return None
        return {k: finite(v) for k, v in x.items()} if isinstance(x, dict) else \
            [finite(v) for v in x] if isinstance(x, list) else x
    return json.dumps(finite(x), allow_nan=False, **kwargs)

def write_json(path: str, x):
    """`x` as JSON in `path`, whole or not at all: written to path.tmp, then renamed."""
    with open(path + ".tmp", "w") as f:
        f.write(to_json(x, indent=2))
    os.replace(path + ".tmp", path)

def start_run(cfg: Config, resumed: dict | None) -> str | None:
    """Rank 0: the run folder (--overwrite: the old run's files deleted first) and config.json with a
    new run id (a resumed run keeps its config and id, and records the command). Returns the run id."""
    rank, world_size = rank_and_world_size()
    cfg.out = all_gather_objects([cfg.out])[0]  # rank 0's: a default name may differ by a second
    if rank > 0: return None
    for name in RUN_FILES if cfg.overwrite else ():
        path = os.path.join(cfg.out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path) if os.path.exists(path) else None
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {cfg.out}: cannot create the run folder ({e.strerror}): choose another --out") from None
    config = {**dataclasses.asdict(cfg), "run_id": uuid.uuid4().hex, "world_size": world_size,
              "torch": torch.__version__, "command": " ".join(sys.argv)}
    if resumed:
        with open(os.path.join(cfg.out, "config.json")) as f:
            saved = json.load(f)
        config = {**saved, **{k: config[k] for k in RESUMABLE + ("resume", "out")},
                  "resumed": saved.get("resumed", []) + [config["command"]]}
    write_json(os.path.join(cfg.out, "config.json"), config)
    return config["run_id"]

def print_start(cfg: Config, device, policy, train_rows: list, evals: dict):
    """A line on what runs, and where its files go."""
    rank, world_size = rank_and_world_size()
    if rank > 0: return
    method = f"egpo (calibration {cfg.calibration}, nsr {cfg.nsr}, renorm {cfg.renorm})" if cfg.algo == "egpo" \
        else cfg.algo
    print(f"egpo: {method} on {cfg.model} / {cfg.dataset}, {device}"
          + (f" x {world_size} processes ({'FSDP' if cfg.fsdp else 'DDP'})" if world_size > 1 else "")
          + f", {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, {len(train_rows)} train problems, "
          + "evaluation on " + (", ".join(f"{k[:-1] or 'held-out'} ({len(p)})" for k, (p, _) in evals.items())
                                or "nothing") + f" -> {cfg.out}")

def print_summary(summary: dict, cfg: Config):
    """One table per evaluation (before and after RL), a row per benchmark."""
    if "sft_steps_done" in summary:
        print(f"\nwarm-up: {summary['sft_steps_done']} supervised steps")
    after = summary.get("after_step", summary["steps_done"])  # a stopped run: its last evaluation
    for stage, title in [("before", "before RL"), ("after", f"after {after} RL steps")]:
        if stage not in summary: continue
        r = summary[stage]
        print(f"\n{title:24s} {'greedy':>7s} {f'pass@1 ± s.e. (k={cfg.eval_samples})':>19s} {'truncated':>9s} "
              f"{'AUROC of -H':>11s} {'H right':>7s} {'H wrong':>7s}")
        for prefix in sorted({key[:-len("eval_acc")] for key in r if key.endswith("eval_acc")}):
            x = {key[len(prefix):]: value for key, value in r.items() if key.startswith(prefix)}
            print(f"{prefix[:-1] or 'held-out':24s} {100 * x['eval_acc']:6.1f}% {100 * x['eval_acc_sampled']:10.1f}% "
                  f"± {100 * x['eval_acc_sampled_se']:4.1f}% {100 * x['eval_truncated']:8.1f}% {x['eval_auroc']:11.3f} "
                  f"{x['eval_entropy_correct']:7.3f} {x['eval_entropy_incorrect']:7.3f}")
    files = "metrics.jsonl, " + "completions.jsonl, " * cfg.log_completions + "config.json, summary.json"
    saved = f" and the model in {cfg.out}/checkpoint/" if os.path.isdir(os.path.join(cfg.out, "checkpoint")) else ""
    if "checkpoint_error" in summary:
        left = summary["last_checkpoint"]
        saved = f"; the checkpoint of step {summary['steps_done']} was not written" + \
            (f": {left['path']} holds step {left['step']}" if left else ", and there is none")
    print(f"\nwrote {cfg.out}/{files}{saved}")

def main(argv=None):
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.set_verbosity_error()  # no retry chatter when the hub is unreachable: our error says it once
    try:
        cfg = resolve(parse_args(argv))
        summary = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C while the model or the data loaded: no run was started
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    # torchrun: the models went with train(); free them now, before their process group (collected at exit,
    # they can abort its teardown under gloo)
    if torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:  # torchrun's rank
        print_summary(summary, cfg)
    if summary.get("interrupted"):
        sys.exit(130)

if __name__ == "__main__":
    main()
