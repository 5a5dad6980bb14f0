"""One model step over a batch of sequence chunks, with multi-token-prediction (MTP) speculative
decoding: the part the single process and an attention shard share.

A chunk computes positions ``start..start+len(tokens)-1`` of a sequence. A decoding chunk may end
with ``drafts`` draft tokens proposed by the MTP layer in the previous step; the main model scores
every position in one pass and ``verify`` keeps the longest prefix of drafts that the main model
agrees with, then adds the main model's own token after it (so a step emits 1..drafts+1 tokens):

- greedy: a draft is kept when it is the argmax (the output is that of plain greedy decoding);
- sampled: the position's token is drawn from ``p`` (the request's distribution after temperature,
  top-k, top-p) with the position's own random stream, exactly as without drafts, and a draft is
  kept when it is that token. The drafts are greedy (a point mass), so this is the standard
  rejection rule (keep ``d`` with probability ``p(d)``, else draw from ``p`` without ``d``): every
  emitted token follows ``p``, and the output is the one plain decoding gives for the seed.

Drafting (``propose`` > 0): the MTP layer (DeepSeek's layer ``num_hidden_layers``) runs over every
position whose token is now final, taking the main model's hidden state at ``p`` after the final
norm (as DeepSeek's modelling code hands it to the MTP layer; vLLM and SGLang do the same) and the
embedding of the token at ``p + 1``; this also fills the MTP layer's own cache. Its prediction at the
last position is the first draft; further drafts reuse the layer on its own output hidden state
after its head's norm and the previous draft, one position at a time, as far as the sequence's
block table reaches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.cache import MLACache
from model.sampling import SamplingParams, position_generator, sample


@dataclass
class ChunkWork:
    seq_id: int
    start: int
    tokens: list[int]  # positions start..start+len-1; the last `drafts` of them are drafts to verify
    sample: bool  # the chunk reaches the end of what is known: pick the token after it
    params: SamplingParams | None = None  # needed when `sample`
    drafts: int = 0
    propose: int = 0  # draft this many tokens for the next step (needs the MTP layer)
    next_token: int | None = None  # a prefill chunk ending inside the prompt: the prompt's next token
    capacity: int = 0  # positions the block table holds (bounds the drafts' own cache writes)
    micro_batch: int = 0  # with ``run_chunks(micro_batches=n)``: which of the n micro-batches it runs in


@dataclass
class ChunkResult:
    tokens: list[tuple[int, list[tuple[int, float]], float | None]] = field(default_factory=list)  # emitted
    accepted: int = 0  # drafts kept
    drafts: list[int] = field(default_factory=list)  # proposed for the next step


def verify(logits: torch.Tensor, drafts: list[int], params: SamplingParams, position: int,
           argmax: list[int] | None = None):
    """``logits`` [len(drafts)+1, vocab]: the main model's scores for positions ``position..``;
    returns the emitted ``(token, top, logprob)`` list (the kept drafts and one more) and how many
    drafts were kept. ``argmax``: each row's best token, computed for the whole batch at once (a
    greedy request's picks).

    Each position's token is drawn exactly as without drafts (``sample`` with the position's own
    random stream) and a draft is kept when it is that token. For a greedy draft (a point mass)
    this is the rejection rule: the draft survives with probability ``p(d)``, and otherwise the
    token follows ``p`` without ``d``. So every token follows the request's distribution, and a
    seeded request gives the same text with or without drafts."""
    out = []
    for j in range(len(drafts) + 1):
        if params.greedy and argmax is not None:
            out.append(sample(logits[j], params, None, token=argmax[j]))
        else:
            out.append(sample(logits[j], params, position_generator(params, position + j, logits.device)))
        if j == len(drafts) or out[-1][0] != drafts[j]:
            break
    return out, len(out) - 1


def require_mtp(path, mtp_layers: int, speculative_tokens: int) -> None:
    """Speculative decoding on a checkpoint whose weights hold ``mtp_layers`` MTP layers: a clear error
    when it has none."""
    if speculative_tokens and not mtp_layers:
        raise ValueError(f"{path} has no MTP layer in its weights: speculative decoding needs one; set "
                         "speculative_tokens to 0")


def mtp_cache_layers(model) -> int:
    """How many cache layers a model with its MTP layers loaded needs."""
    return model.num_layers + len(model.mtp_layers)


def run_chunks(model, cache: MLACache, works: list[ChunkWork], tables: dict[int, list[int]] | None = None,
               micro_batches: int = 1):
    """One forward over ``works`` -> ``{seq_id: ChunkResult}`` for the chunks that sample or draft.

    ``micro_batches`` > 1: the works run as that many micro-batches (``ChunkWork.micro_batch``; some
    may be empty) interleaved at the MoE layers (``Transformer.forward_parts``): an attention
    shard's way of computing one micro-batch's attention while the other's rows are at the experts."""
    device = cache.device
    works = sorted(works, key=lambda w: w.micro_batch)  # stable: the order stays within a micro-batch
    parts = [[w for w in works if w.micro_batch == m] for m in range(micro_batches)]
    inputs, query_starts = [], [0]
    for part in parts:
        meta = cache.build_meta([(w.seq_id, w.start, w.start + len(w.tokens)) for w in part], tables)
        inputs.append((torch.tensor([t for w in part for t in w.tokens], dtype=torch.long, device=device), meta))
        query_starts += [query_starts[-1] + q for q in meta.query_starts[1:]]
    hidden = model(*inputs[0], cache) if len(inputs) == 1 else torch.cat(model.forward_parts(inputs, cache))
    results: dict[int, ChunkResult] = {}
    picks = [i for i, w in enumerate(works) if w.sample]
    if picks:
        rows = [r for i in picks for r in range(query_starts[i + 1] - works[i].drafts - 1, query_starts[i + 1])]
        logits = model.logits(hidden[torch.tensor(rows, device=device)])
        # greedy requests' picks in one operation for the batch, not one per row
        argmax = logits.argmax(dim=-1).tolist() if any(works[i].params.greedy for i in picks) else None
        at = 0
        for i in picks:
            w = works[i]
            n = w.drafts + 1
            emitted, accepted = verify(logits[at:at + n], w.tokens[len(w.tokens) - w.drafts:], w.params,
                                       w.start + len(w.tokens) - w.drafts, argmax and argmax[at:at + n])
            results[w.seq_id] = ChunkResult(emitted, accepted)
            at += n
    drafting = [i for i, w in enumerate(works) if w.propose and model.mtp_layers
                and (w.sample or w.next_token is not None)]
    if drafting:
        _draft(model, cache, works, drafting, query_starts, hidden, results, tables)
    return results


def _draft(model, cache, works, drafting, query_starts, hidden, results, tables) -> None:
    mtp, n = model.mtp_layers[0], model.num_layers
    device = cache.device
    index_cache = cache.index_cache(n)
    seqs, rows, next_ids, chains = [], [], [], []
    for i in drafting:
        w = works[i]
        res = results.setdefault(w.seq_id, ChunkResult())
        final = len(w.tokens) - w.drafts + res.accepted  # positions whose tokens are now final
        after = res.tokens[-1][0] if w.sample else w.next_token
        seqs.append((w.seq_id, w.start, w.start + final))
        rows += range(query_starts[i], query_starts[i] + final)
        next_ids += w.tokens[1:final] + [after]
        chains.append((w, res, w.start + final))
    mmeta = model.prepare(cache.build_meta(seqs, tables))
    h = mtp.hidden(model.normed(hidden[torch.tensor(rows, device=device)]), torch.tensor(next_ids, device=device),
                   mmeta, cache.kv[n], cache.pe[n], index_cache)
    last = torch.tensor(mmeta.query_starts[1:], device=device) - 1
    h = h[last]
    tokens = mtp.head(h).argmax(dim=-1)
    for (w, res, _), t in zip(chains, tokens.tolist(), strict=True):
        if w.sample:  # a prefill chunk inside the prompt only fills the MTP layer's cache
            res.drafts.append(t)
    # further drafts: the MTP layer again, on its own output and the previous draft, one position on
    for k in range(1, max(w.propose for w, _, _ in chains)):
        live = [j for j, (w, _, pos) in enumerate(chains) if w.sample and w.propose > k and pos + k - 1 < w.capacity]
        if not live:
            break
        step = [(chains[j][0].seq_id, chains[j][2] + k - 1, chains[j][2] + k) for j in live]
        smeta = model.prepare(cache.build_meta(step, tables))
        prev = torch.tensor([chains[j][1].drafts[-1] for j in live], device=device)
        h = mtp.hidden(h[torch.tensor(live, device=device)], prev, smeta, cache.kv[n], cache.pe[n], index_cache)
        for j, t in zip(live, mtp.head(h).argmax(dim=-1).tolist(), strict=True):
            chains[j][1].drafts.append(t)
        chains = [chains[j] for j in live]


def assign_micro_batches(sizes: list[int], n: int) -> list[int]:
    """The micro-batch of each chunk (``sizes``: its tokens) when a batch runs as ``n``: contiguous
    runs of about equal tokens. The engine calls it to bound each micro-batch, the shard to split."""
    total, out, acc = sum(sizes), [], 0
    for size in sizes:
        out.append(min(n - 1, acc * n // total) if total else 0)
        acc += size
    return out


def speculative_for(params: SamplingParams, default: int, have_mtp: bool) -> int:
    """Drafts per step for a request: its own ``speculative_tokens``, else the server's default."""
    k = default if params.speculative_tokens is None else params.speculative_tokens
    if k and not have_mtp:
        raise ValueError(f"speculative_tokens={k} needs the model's MTP layer, which this server did not load: "
                         "start it with --speculative-tokens K (K > 0), or send speculative_tokens 0")
    return k
