"""The DeepSeek-V2/V3 network in one process; module names match the checkpoint's tensor names."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from model.attention import MLA, AttnMeta, latent_dtype
from model.config import ModelArgs
from model.layers import MLP, Linear, RMSNorm
from model.moe import MoE, RoutedExperts, interleave, run_stages
from model.rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype, fp8_block=None,
                 routed_experts: RoutedExperts | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLA(args, dtype, fp8_block)
        if args.is_moe_layer(layer_id):
            self.mlp = MoE(args, layer_id, dtype, fp8_block, routed_experts)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size, dtype, fp8_block)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)

    def forward(self, x, residual, meta, kv_cache, pe_cache, absorb=True, index_cache=None):
        """Pre-norm block with the residual carried separately (fused add + norm): returns
        ``(output, residual)``. A plain function where the routed experts are in this process."""
        h, residual = self.attend(x, residual, meta, kv_cache, pe_cache, absorb, index_cache)
        return self.mlp(h), residual

    def stages(self, x, residual, meta, kv_cache, pe_cache, absorb=True, index_cache=None):
        """``forward`` as a generator (see ``MoE.stages``): returns ``(output, residual)``."""
        h, residual = self.attend(x, residual, meta, kv_cache, pe_cache, absorb, index_cache)
        if isinstance(self.mlp, MoE):
            return (yield from self.mlp.stages(h)), residual
        return self.mlp(h), residual

    def attend(self, x, residual, meta, kv_cache, pe_cache, absorb=True, index_cache=None):
        """The norms and attention: -> (the MLP's normed input, residual)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, meta, kv_cache, pe_cache, absorb, index_cache)
        return self.post_attention_layernorm(h, residual)


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.head = Linear(args.hidden_size, args.vocab_size, dtype=dtype)


class MTPBlock(Block):
    """Multi-token prediction module (layer ``num_hidden_layers``): predicts token ``t+2`` from the
    main model's hidden state at ``t`` after its final norm (what its head reads, as DeepSeek's
    modelling code hands it over) and the embedding of token ``t+1``."""

    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype, fp8_block=None):
        super().__init__(args, layer_id, dtype, fp8_block)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, dtype=dtype)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.eh_proj = Linear(2 * args.hidden_size, args.hidden_size, dtype=dtype)
        self.shared_head = SharedHead(args, dtype)
        self.embed_tokens.weight.requires_grad_(False)

    def predict(self, hidden, next_ids, meta, kv_cache, pe_cache, index_cache=None) -> torch.Tensor:
        """``hidden`` [T, hidden] from the main model (after its final norm), ``next_ids`` [T] ->
        logits [T, vocab] (float32)."""
        return self.head(self.hidden(hidden, next_ids, meta, kv_cache, pe_cache, index_cache))

    def hidden(self, hidden, next_ids, meta, kv_cache, pe_cache, index_cache=None) -> torch.Tensor:
        """The module's output hidden states [T, hidden] after its head's norm: what ``head`` reads,
        and what a further draft step takes in place of the main model's (normed) hidden state."""
        h = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(next_ids)), self.hnorm(hidden)], dim=-1))
        h, residual = self.forward(h, None, meta, kv_cache, pe_cache, True, index_cache)
        return self.shared_head.norm(h + residual)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(hidden).float()


class Model(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype, fp8_block=None, with_mtp: bool = True,
                 routed_experts: RoutedExperts | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        layers = [Block(args, i, dtype, fp8_block, routed_experts) for i in range(args.num_hidden_layers)]
        if with_mtp:
            n = args.num_hidden_layers
            layers += [MTPBlock(args, n + i, dtype, fp8_block) for i in range(args.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)


class Transformer(nn.Module):
    """Embedding, ``num_hidden_layers`` blocks, final norm and ``lm_head`` (+ MTP layers)."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.bfloat16, with_mtp: bool = True,
                 routed_experts: RoutedExperts | None = None):
        """``routed_experts``: the main layers' routed experts run there (an attention shard's model
        holds everything else); ``None``: the whole model in this process."""
        super().__init__()
        self.args, self.dtype = args, dtype
        fp8_block = args.quant.weight_block_size if args.quant else None
        self.model = Model(args, dtype, fp8_block, with_mtp, routed_experts)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, dtype=dtype)
        self.tie_weights()
        self.rotary = RotaryEmbedding(args)
        self._decode = None  # decode steps through torch.compile (``compile_decode``)
        self._decode_tokens = 0  # up to this many tokens per step

    def tie_weights(self) -> None:
        """``tie_word_embeddings``: the head is the embedding (one tensor; a tied checkpoint has no
        ``lm_head.weight``). Called again after ``to_empty``, which gives each module its own copy."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return self.args.num_hidden_layers

    @property
    def moe_modules(self) -> dict[int, MoE]:
        return {i: self.model.layers[i].mlp for i in self.args.moe_layers}

    @property
    def mtp_layers(self) -> list[MTPBlock]:
        return list(self.model.layers[self.num_layers:])

    def prepare(self, meta: AttnMeta) -> AttnMeta:
        meta.cos, meta.sin = self.rotary.cos_sin(meta.positions)
        return meta

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMeta, cache, absorb: bool = True) -> torch.Tensor:
        """``input_ids`` [T] (a flattened batch described by ``meta``) -> final hidden states [T, hidden]."""
        if (self._decode is not None and meta.block_table is not None and absorb
                and input_ids.shape[0] <= self._decode_tokens):
            try:
                return self._decode(input_ids, self.prepare(meta), cache)
            except Exception as e:  # noqa: BLE001 - a compiler failure must not fail the step: eager computes it
                warnings.warn(f"compiled decode step failed ({type(e).__name__}: {str(e)[:300]}); this model runs "
                              "eagerly from now on", RuntimeWarning, stacklevel=2)
                self._decode = None  # the step's cache writes are redone below with the same values
        return run_stages(self.stages(input_ids, meta, cache, absorb))

    def compile_decode(self) -> None:
        """Run the steps that carry the paged view (at most ``PAGED_ROWS_MAX`` tokens per sequence:
        decode, draft verification, short prefills) through ``torch.compile``, as one graph of every
        layer, dynamic in the batch and the context. On a CPU its generated kernels fuse the
        elementwise operations a small model's step is mostly made of (the default model, 2 cores:
        about 2x the eager decode rate at batch 1 and 1.5x at batch 8). Compiling takes 10-30 s per
        shape class (batch 1, larger batches) on first use.

        For a whole float model on a CPU whose experts take the dense form (``MoE.dense``: few
        experts against top-k, as small models have), up to as many tokens as that form takes; other
        steps run eagerly. Refused otherwise, with the reason: the sorted expert path, the V3.2
        indexer and the FP8 kernels have data-dependent shapes or their own rounding, and on CUDA the
        Triton kernels run as they are."""
        a, device = self.args, self.lm_head.weight.device
        if device.type != "cpu":
            raise ValueError(f"compile is for a CPU; this model is on {device}, where its Triton kernels run as "
                             "they are: leave compile off")
        if any(m.routed_experts is not None for m in self.moe_modules.values()):
            raise ValueError("compile needs the whole model in one process; an attention shard's is not compiled")
        if a.quant is not None:
            raise ValueError("compile is for float weights; this checkpoint is block-FP8 (its kernels are not "
                             "compiled): leave compile off")
        if a.index_topk:
            raise ValueError("compile does not cover DeepSeek-V3.2's indexer (its selection changes shape every "
                             "step): leave compile off")
        moe = list(self.moe_modules.values())
        # MoE.dense builds the stacked weights the graph reads (here, not traced into it), or says the
        # model has too many experts for the dense form
        if any(m.dense(1) is None for m in moe):
            raise ValueError(f"compile needs the dense expert form (n_routed_experts <= 4 x num_experts_per_tok); "
                             f"this model routes {a.num_experts_per_tok} of {a.n_routed_experts} experts: leave "
                             "compile off")
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - inductor's own error names what it looked for
            raise ValueError(f"compile needs a C++ compiler for torch's CPU code generation ({e}): install g++ "
                             "or leave compile off") from None
        self._decode_tokens = moe[0].dense_tokens if moe else 2**31
        for layer in self.model.layers[:self.num_layers]:  # kv_b_proj as MLA reads it, built here too
            layer.self_attn.wkv_b(latent_dtype(device, self.dtype))
        # fullgraph: a break in the graph would quietly run the whole stack eagerly; it raises instead, and
        # ``forward`` warns and goes on eagerly (so does a model past the compiler's recompile limit)
        self._decode = torch.compile(self._layers, dynamic=True, fullgraph=True)

    def _layers(self, input_ids: torch.Tensor, meta: AttnMeta, cache) -> torch.Tensor:
        """``stages`` as a plain function, for the compiler (``meta`` prepared already)."""
        x, residual = self.model.embed_tokens(input_ids), None
        for i in range(self.num_layers):
            x, residual = self.model.layers[i](x, residual, meta, cache.kv[i], cache.pe[i], True,
                                               cache.index_cache(i))
        return x + residual

    @torch.inference_mode()
    def forward_parts(self, parts: list[tuple[torch.Tensor, AttnMeta]], cache) -> list[torch.Tensor]:
        """Several micro-batches ``(input_ids, meta)`` of disjoint sequences at once, interleaved at
        their MoE layers: while one micro-batch's routed rows are at the expert actors, the next one
        computes its attention. -> each one's final hidden states."""
        return interleave([self.stages(ids, meta, cache) for ids, meta in parts])

    def stages(self, input_ids: torch.Tensor, meta: AttnMeta, cache, absorb: bool = True):
        """The forward pass as a generator (it yields at each MoE layer whose routed experts are elsewhere)."""
        self.prepare(meta)
        x, residual = self.model.embed_tokens(input_ids), None
        for i in range(self.num_layers):
            x, residual = yield from self.model.layers[i].stages(x, residual, meta, cache.kv[i], cache.pe[i], absorb,
                                                                 cache.index_cache(i))
        return x + residual

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head: [T, hidden] -> [T, vocab] float32."""
        return self.lm_head(self.normed(hidden)).float()

    @torch.inference_mode()
    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm alone: what the MTP layer takes from the main model."""
        return self.model.norm(hidden)
