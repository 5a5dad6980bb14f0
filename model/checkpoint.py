"""Reading Hugging Face safetensors checkpoints: whole models or a chosen subset of tensors.

Only safetensors are read (never pickles). Sharded checkpoints are found through
``model.safetensors.index.json``; a folder of ``*.safetensors`` without an index works too.
``validate_checkpoint`` checks a checkpoint from its headers alone, before any weight is read.

A safetensors file: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON header
(``name -> {dtype, shape, data_offsets: [begin, end]}``, offsets counted from the end of the
header), then the tensor data, which must end exactly where the largest ``end`` says.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

import kernels
from model.config import ModelArgs, read_json_object

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the tensor or file and the fix."""


def _corrupt(file: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{file} is truncated or corrupt ({reason}); re-download or re-write it")


@contextmanager
def _open_safetensors(file: Path, device: str = "cpu") -> Iterator:
    """``safe_open`` whose errors, at open (a cut or padded file fails there) or while reading a
    tensor, name the file and the fix."""
    try:
        with safe_open(file, framework="pt", device=device) as f:
            yield f
    except SafetensorError as e:
        raise _corrupt(file, f"safetensors: {e}") from e


def read_header(file: Path) -> dict[str, dict]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets), from its header
    alone; a file whose size is not exactly header plus data raises ``CheckpointError``."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(file, "it is shorter than the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        if 8 + n > size or n > MAX_HEADER_BYTES:
            raise _corrupt(file, f"its header length {n} is impossible in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # bad JSON or bad UTF-8
            raise _corrupt(file, "its header is not valid JSON") from e
    if not isinstance(header, dict):
        raise _corrupt(file, "its header is not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str)):
            raise _corrupt(file, f"its header entry {name!r} is malformed; it needs dtype, shape and data_offsets")
    data_bytes = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + data_bytes != size:
        raise _corrupt(file, f"its header describes {8 + n + data_bytes} bytes but the file holds {size}")
    return header


def _missing_scale_error(weight: str) -> CheckpointError:
    return CheckpointError(
        f"config.json has an FP8 quantization_config but {weight!r} has no {weight + '_scale_inv'!r}; "
        "remove quantization_config from config.json or use the FP8 weights"
    )


def _shape_error(name: str, shape: Iterable[int], expected: Iterable[int]) -> CheckpointError:
    return CheckpointError(
        f"tensor {name!r} has shape {list(shape)} in the checkpoint but the config expects {list(expected)}; "
        "check config.json against the weights"
    )


def _not_fp8_error(name: str, dtype) -> CheckpointError:
    return CheckpointError(
        f"tensor {name!r} is {dtype} but quantization_config says FP8; "
        "remove quantization_config from config.json or use the FP8 weights"
    )


def checkpoint_folder(path: str | Path) -> Path:
    """``path`` as a checkpoint folder that exists, else a ``CheckpointError`` saying what it is."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file; give the checkpoint folder (the one that holds config.json)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    return path


class CheckpointReader:
    """Maps tensor names to safetensors files and reads any subset of them."""

    def __init__(self, path: str | Path):
        self.path = checkpoint_folder(path)
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = read_json_object(index).get("weight_map")
            except ValueError as e:
                raise CheckpointError(str(e)) from e
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object")
            for name, file in weight_map.items():
                if not isinstance(file, str):
                    raise CheckpointError(f"{index} maps {name!r} to {file!r}, not a file name; re-download it")
            for file in set(weight_map.values()):
                if not (self.path / file).exists():
                    raise CheckpointError(f"{index} lists {file}, which is missing from {self.path}")
            return weight_map
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise CheckpointError(
                    f"{self.path} holds only {', '.join(pickles)}: raymoe reads safetensors only and never "
                    "unpickles a checkpoint; convert it to *.safetensors first"
                )
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        weight_map = {}
        for file in files:
            with _open_safetensors(file) as f:
                for name in f.keys():
                    weight_map[name] = file.name
        return weight_map

    @property
    def args(self) -> ModelArgs:
        return with_present_mtp(ModelArgs.from_hf(self.path), self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: Iterable[str], device: str | torch.device = "cpu", progress: bool = False,
             desc: str = "loading") -> dict[str, torch.Tensor]:
        """Read ``names`` (each file opened once); a missing name raises ``CheckpointError``."""
        by_file: dict[str, list[str]] = defaultdict(list)
        names = list(names)
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(
                    f"tensor {name!r} is missing from the checkpoint {self.path}; "
                    "the config.json and the weights do not match"
                )
            by_file[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        bar = tqdm(total=len(names), desc=desc, unit="tensor", disable=not progress, leave=False)
        for file, file_names in by_file.items():
            with _open_safetensors(self.path / file, str(device)) as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
                    bar.update()
        bar.close()
        return out


def with_present_mtp(args: ModelArgs, weight_map: dict[str, str]) -> ModelArgs:
    """``args`` with ``num_nextn_predict_layers`` cut to the MTP layers the weights hold any tensor
    of: transformers writes ``num_nextn_predict_layers: 1`` without the layer, and derivatives of
    DeepSeek-V3 strip it. Such a checkpoint serves; speculative decoding says it has no MTP layer."""
    first = args.num_hidden_layers
    present = 0
    while present < args.num_nextn_predict_layers:
        prefix = f"model.layers.{first + present}."
        if not any(name.startswith(prefix) for name in weight_map):
            break
        present += 1
    return args if present == args.num_nextn_predict_layers else args.replace(num_nextn_predict_layers=present)


def load_into(module: torch.nn.Module, reader: CheckpointReader, prefix: str = "",
              progress: bool = True, desc: str = "loading weights") -> None:
    """Fill every parameter of ``module`` from the checkpoint tensor of the same name (after
    ``prefix``). Shapes must match exactly; float tensors are cast to the parameter's dtype."""
    params = dict(module.named_parameters())
    for n in params:
        if n.endswith("weight_scale_inv") and prefix + n not in reader:
            raise _missing_scale_error(prefix + n[: -len("_scale_inv")])
    names = [prefix + n for n in params]
    # FP8 weights loaded into a float model (dequantised at load): read their scales too
    names += [n + "_scale_inv" for n in names if n + "_scale_inv" in reader and n + "_scale_inv" not in names]
    tensors = reader.read(names, progress=progress, desc=desc)
    with torch.no_grad():
        for name, param in params.items():
            t = tensors[prefix + name]
            if tuple(t.shape) != tuple(param.shape):
                raise _shape_error(prefix + name, t.shape, param.shape)
            if param.dtype == torch.float8_e4m3fn and t.dtype != torch.float8_e4m3fn:
                raise _not_fp8_error(prefix + name, t.dtype)
            if t.dtype == torch.float8_e4m3fn and param.dtype != torch.float8_e4m3fn:
                t = kernels.reference.weight_dequant_float(t, tensors[prefix + name + "_scale_inv"])
            param.copy_(t.to(param.dtype))
    for m in module.modules():  # weights derived from the old parameters are stale now
        if hasattr(m, "reset_caches"):
            m.reset_caches()


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
               with_mtp: bool = True, progress: bool = True, dequantize_fp8: bool = False,
               routed_experts=None, index_fp8: bool = False):
    """Build the single-process model for the checkpoint at ``path`` and load its weights.
    ``dequantize_fp8``: run an FP8 checkpoint with ``dtype`` weights (dequantised once at load).
    ``routed_experts`` (a ``model.moe.RoutedExperts``): the routed experts run there and are not
    loaded here (an attention shard's part of the model). ``index_fp8``: DeepSeek-V3.2's indexer on
    its FP8 path (``model.indexer``) instead of the exact one."""
    from model.transformer import Transformer

    reader = CheckpointReader(path)
    args = reader.args
    if dequantize_fp8:
        args = args.replace(quant=None)
    if index_fp8:
        if not args.index_topk:
            raise ValueError("index_fp8 is for DeepSeek-V3.2 checkpoints (model_type deepseek_v32); this one has "
                             "no indexer")
        args = args.replace(index_fp8=True)
    with torch.device("meta"):
        model = Transformer(args, dtype, with_mtp=with_mtp, routed_experts=routed_experts)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.rotary = type(model.rotary)(args).to(device)
    load_into(model, reader, progress=progress)
    return model.eval()


def validate_checkpoint(path: str | Path, need_tokenizer: bool = False) -> ModelArgs:
    """The cheap checks to run before any actor starts, from ``config.json``, the index and the
    safetensors headers only (no tensor data is read): the config parses; every file is whole and
    holds what the index says; every tensor the model reads is there with the config's shape (FP8:
    with its ``weight_scale_inv``); MTP layers are checked only where the checkpoint has them (the
    returned args count only those: ``with_present_mtp``); with ``need_tokenizer``, the tokenizer
    loads. Each failure is one ``CheckpointError``."""
    path = checkpoint_folder(path)
    try:
        args = ModelArgs.from_hf(path)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from e
    reader = CheckpointReader(path)
    args = with_present_mtp(args, reader.weight_map)
    headers = {file: read_header(path / file) for file in sorted(set(reader.weight_map.values()))}
    for name, file in reader.weight_map.items():
        if name not in headers[file]:
            raise CheckpointError(
                f"{path / INDEX_FILE} puts {name!r} in {file}, whose header does not list it; "
                "the index and the weight files do not match, re-download them"
            )
    expected = _expected_tensors(args)
    missing = [n for n in expected if n not in reader]
    for n in missing:
        if n.endswith("weight_scale_inv"):
            raise _missing_scale_error(n[: -len("_scale_inv")])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"tensor {missing[0]!r}{more} is missing from the checkpoint {path}; "
            "the config.json and the weights do not match"
        )
    for name, param in expected.items():
        entry = headers[reader.weight_map[name]][name]
        if entry["shape"] != list(param.shape):
            raise _shape_error(name, entry["shape"], param.shape)
        if param.dtype == torch.float8_e4m3fn and entry["dtype"] != "F8_E4M3":
            raise _not_fp8_error(name, entry["dtype"])
    if need_tokenizer:
        _check_tokenizer(path)
    return args


def _expected_tensors(args: ModelArgs) -> dict[str, torch.Tensor]:
    """Name -> meta tensor (shape, dtype) of every tensor the model reads: what ``load_model``
    fills, the routed experts the expert actors read (``actors.expert_bank.ExpertBank.load``), and the
    MTP layers ``args`` counts (``with_present_mtp``)."""
    from model.layers import MLP
    from model.moe import experts_elsewhere
    from model.transformer import Transformer

    fp8_block = args.quant.weight_block_size if args.quant else None
    try:
        with torch.device("meta"):
            # the routed experts of all layers are one MLP's names repeated: far cheaper to list than build
            model = Transformer(args, with_mtp=True, routed_experts=experts_elsewhere)
            expert = MLP(args.hidden_size, args.moe_intermediate_size, torch.bfloat16, fp8_block)
    except NotImplementedError as e:
        raise CheckpointError(str(e)) from e
    expected = dict(model.named_parameters())
    for layer in args.moe_layers:
        for e in range(args.n_routed_experts):
            for n, t in expert.named_parameters():
                expected[f"model.layers.{layer}.mlp.experts.{e}.{n}"] = t
    return expected


def _check_tokenizer(path: Path) -> None:
    from model.tokenizer import Tokenizer

    file, config = path / "tokenizer.json", path / "tokenizer_config.json"
    if not file.exists():
        raise CheckpointError(
            f"{file} is missing; the page takes text, so the checkpoint needs its tokenizer.json "
            "(copy it from the model's repository)"
        )

    def unloadable(f: Path, e: Exception) -> CheckpointError:
        return CheckpointError(f"{f} does not load ({e}); the page needs it to turn text into tokens, re-download it")

    try:
        if config.exists():
            json.loads(config.read_bytes())
    except ValueError as e:  # bad JSON or bad UTF-8
        raise unloadable(config, e) from e
    try:
        Tokenizer.from_dir(path)
    except Exception as e:  # the tokenizers library raises plain Exception
        raise unloadable(file, e) from e
