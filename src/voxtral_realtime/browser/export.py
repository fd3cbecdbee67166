"""Export the model for a browser page: the two step graphs (:mod:`.graphs`) as ONNX, their weight shards, the
tokenizer and a manifest (docs/architecture.md, "The browser export").

Weights are ONNX external data in shards of at most 512 MB; ``q4``/``q8`` use onnxruntime's ``MatMulNBits``
quantizer, ``fp16`` stores weights in half precision and casts them to float32 in the graph (computation stays in
float32, which every onnxruntime backend runs).  onnx, onnxruntime and onnxscript are optional dependencies: only
this package needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import VoxtralError, first_line
from .graphs import AudioStepGraph, DecoderStepGraph

QUANTS = ("fp32", "fp16", "q4", "q8")
#: Largest external-data file, 512 MB (decimal: the Rust project's browser shards are "512 MB"; browsers cache
#: them whole).  The LM head's blocks are cut to fit it.
SHARD_BYTES = 512_000_000
#: Initializers smaller than this stay inside the .onnx file (norm gains, biases, small tables).
INLINE_BYTES = 4096
#: Block length of the MatMulNBits quantization (values per scale).
QUANT_BLOCK = 32
MANIFEST_FORMAT = 1
ONNX_OPSET = 18
AUDIO_GRAPH, DECODER_GRAPH = "audio_step.onnx", "decoder_step.onnx"


def require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise VoxtralError("exporting for the web needs onnx, onnxruntime and onnxscript: "
                           "pip install onnx onnxruntime onnxscript") from None
    return onnx, onnxruntime




@dataclass
class GraphSpec:
    file: str
    inputs: list[dict[str, Any]]  # name, shape, dtype
    outputs: list[str]
    state: list[dict[str, Any]] = field(default_factory=list)  # input, output, shape, dtype, fill


def _export_graph(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=input_names, output_names=output_names,
                          opset_version=ONNX_OPSET, dynamo=False, do_constant_folding=True,
                          external_data=True)


def _audio_spec(graph: AudioStepGraph) -> tuple[GraphSpec, tuple[torch.Tensor, ...]]:
    state = graph.state_shapes()
    inputs = [{"name": "samples", "shape": [graph.samples], "dtype": "float32"},
              {"name": "position", "shape": [1], "dtype": "int64"}]
    spec = GraphSpec(AUDIO_GRAPH, inputs, ["embedding"],
                     [{"input": n, "output": f"{n}_out", "shape": s, "dtype": "float32", "fill": 0.0}
                      for n, s in state])
    example = (torch.zeros(graph.samples), torch.zeros(state[0][1]), torch.zeros(state[1][1]),
               torch.tensor([8], dtype=torch.long), *(torch.zeros(s) for _, s in state[2:]))
    return spec, example


def _decoder_spec(graph: DecoderStepGraph) -> tuple[GraphSpec, tuple[torch.Tensor, ...]]:
    dim = graph.decoder.cfg.dim
    state = graph.state_shapes()
    inputs = [{"name": "token", "shape": [1], "dtype": "int64"},
              {"name": "audio", "shape": [1, dim], "dtype": "float32"},
              {"name": "position", "shape": [1], "dtype": "int64"},
              {"name": "delay", "shape": [1], "dtype": "float32"}]
    spec = GraphSpec(DECODER_GRAPH, inputs, ["next_token"],
                     [{"input": n, "output": f"{n}_out", "shape": s, "dtype": "float32", "fill": 0.0}
                      for n, s in state])
    example = (torch.tensor([1], dtype=torch.long), torch.zeros(1, dim), torch.tensor([3], dtype=torch.long),
               torch.tensor([6.0]), *(torch.zeros(s) for _, s in state))
    return spec, example


def _export_order(spec: GraphSpec) -> tuple[list[str], list[str]]:
    """Input and output names in the modules' argument order (fixed inputs, then state)."""
    fixed = [i["name"] for i in spec.inputs]
    if spec.file == AUDIO_GRAPH:  # forward(samples, mel_tail, conv1_tail, position, *cache)
        state = [s["input"] for s in spec.state]
        names = [fixed[0], state[0], state[1], fixed[1], *state[2:]]
    else:
        names = fixed + [s["input"] for s in spec.state]
    return names, spec.outputs + [s["output"] for s in spec.state]


def _to_fp16_storage(onnx: Any, model: Any, prefix: str = "") -> None:
    """Store large float32 initializers (those whose names start with ``prefix``) as float16, each followed by a
    Cast back to float32 (computation stays float32: the CPU and WebAssembly backends have few float16
    kernels)."""
    from onnx import numpy_helper

    casts = []
    for init in model.graph.initializer:
        if (init.data_type != onnx.TensorProto.FLOAT or _tensor_bytes(init) < INLINE_BYTES
                or not init.name.startswith(prefix)):
            continue
        array = numpy_helper.to_array(init).astype(np.float16)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(array, name + "_fp16"))
        casts.append(onnx.helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                           name=f"cast_{name}"))
    for node in reversed(casts):
        model.graph.node.insert(0, node)


def _embed_from_quantized_head(onnx: Any, model: Any) -> None:
    """Make the token lookup read the quantized LM head (the tied weight) instead of a table of its own.

    The quantizer turns each head block's MatMul into MatMulNBits with ``head.{b}_Q{bits}`` [N, blocks, bytes]
    (values packed low bits first) and ``head.{b}_scales`` [N, blocks], symmetric, so the implicit zero point is
    ``2 ** (bits - 1)``; row ``t`` of that weight is token ``t``'s embedding.  Each ``Gather(embedding.{b}, i)``
    becomes a gather of the packed row and its scales and a dequantization in standard ops, and the float table
    is dropped: the download carries the embedding once, quantized.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, new_nodes, dropped = list(model.graph.node), [], set()
    for node in nodes:
        table = node.input[0] if node.op_type == "Gather" and node.input else ""
        if not table.startswith("embedding."):
            new_nodes.append(node)
            continue
        block = table.removeprefix("embedding.")
        head = next((n for n in nodes if n.op_type == "MatMulNBits" and n.input[1].startswith(f"head.{block}_Q")),
                    None)
        if head is None:
            raise VoxtralError(f"internal error: no quantized head block {block} for the token lookup")
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        bits, size, k = attrs["bits"], attrs["block_size"], attrs["K"]
        packed, scales = head.input[1], head.input[2]
        blocks = inits[packed].dims[1]
        p = f"embed{block}_"
        c = {  # small constants of the dequantization
            "levels": numpy_helper.from_array(np.array(1 << bits, np.int32), p + "levels"),
            "zero": numpy_helper.from_array(np.array(1 << (bits - 1), np.int32), p + "zero"),
            "shape": numpy_helper.from_array(np.array([-1, blocks, size], np.int64), p + "shape"),
            "flat": numpy_helper.from_array(np.array([-1, blocks * size], np.int64), p + "flat"),
            "last": numpy_helper.from_array(np.array([-1], np.int64), p + "last"),
            "start": numpy_helper.from_array(np.array([0], np.int64), p + "start"),
            "end": numpy_helper.from_array(np.array([k], np.int64), p + "end"),
        }
        index = node.input[1]
        steps = [helper.make_node("Gather", [packed, index], [p + "bytes"], axis=0),
                 helper.make_node("Cast", [p + "bytes"], [p + "ints"], to=onnx.TensorProto.INT32)]
        digits = [p + "ints"]
        if bits < 8:  # unpack: value j of a byte is (byte // levels**j) % levels, lowest first
            digits = []
            current = p + "ints"
            for j in range(8 // bits):
                steps.append(helper.make_node("Mod", [current, c["levels"].name], [f"{p}d{j}"]))
                steps.append(helper.make_node("Unsqueeze", [f"{p}d{j}", c["last"].name], [f"{p}u{j}"]))
                digits.append(f"{p}u{j}")
                if j + 1 < 8 // bits:
                    steps.append(helper.make_node("Div", [current, c["levels"].name], [f"{p}r{j}"]))
                    current = f"{p}r{j}"
            steps.append(helper.make_node("Concat", digits, [p + "digits"], axis=-1))
            digits = [p + "digits"]
        steps += [
            helper.make_node("Reshape", [digits[0], c["shape"].name], [p + "q"]),
            helper.make_node("Sub", [p + "q", c["zero"].name], [p + "centred"]),
            helper.make_node("Cast", [p + "centred"], [p + "values"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [scales, index], [p + "row_scales"], axis=0),
            helper.make_node("Unsqueeze", [p + "row_scales", c["last"].name], [p + "scale"]),
            helper.make_node("Mul", [p + "values", p + "scale"], [p + "scaled"]),
            helper.make_node("Reshape", [p + "scaled", c["flat"].name], [p + "padded"]),
            helper.make_node("Slice", [p + "padded", c["start"].name, c["end"].name, c["last"].name],
                             list(node.output)),
        ]
        new_nodes += steps
        used = {name for step in steps for name in step.input}
        model.graph.initializer.extend(t for t in c.values() if t.name in used)
        dropped.add(table)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    kept = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _tensor_bytes(init: Any) -> int:
    from onnx import helper

    count = int(np.prod(init.dims)) if len(init.dims) else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def _quantize(model: Any, bits: int) -> Any:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # the quantizer logs every node at INFO level: a line per weight on the user's terminal
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=QUANT_BLOCK, is_symmetric=True,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


def _save_sharded(onnx: Any, model: Any, out: Path, stem: str, shard_bytes: int) -> list[str]:
    """Write ``model`` to ``out/stem.onnx`` with its large initializers in ``stem.weights.N`` files of at most
    ``shard_bytes`` each (an initializer never spans two files); return the shard file names."""
    from onnx.external_data_helper import set_external_data

    # first plan which file and offset each large initializer goes to, then write each file in one go
    shards: list[list[Any]] = []
    used = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise VoxtralError(f"internal error: {init.name} still refers to external data")
        size = len(init.raw_data)
        if size < INLINE_BYTES:
            continue
        if size > shard_bytes:
            raise VoxtralError(f"weight {init.name} is {size} bytes, more than one shard ({shard_bytes})")
        used += (-used) % 64  # 64-byte alignment lets onnxruntime map tensors in place
        if not shards or used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((init, used))
        used += size
    names = [f"{stem}.weights.{i}" for i in range(len(shards))]
    for name, members in zip(names, shards):
        with open(out / name, "wb") as handle:
            for init, offset in members:
                handle.write(b"\0" * (offset - handle.tell()))
                handle.write(init.raw_data)
                set_external_data(init, name, offset=offset, length=len(init.raw_data))
                init.data_location = onnx.TensorProto.EXTERNAL
                init.ClearField("raw_data")
    (out / f"{stem}.onnx").write_bytes(model.SerializeToString())
    return names


def _load_with_raw_data(onnx: Any, path: Path) -> Any:
    """Load an exported graph with every initializer as raw bytes (the exporter writes some as typed fields)."""
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    for init in model.graph.initializer:
        if not init.HasField("raw_data"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
    return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_web(model: Any, out: str | os.PathLike[str], *, quant: str = "q4", decoder_context: int | None = None,
               shard_bytes: int = SHARD_BYTES, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write the browser bundle of ``model`` (a loaded :class:`.api.Model`, float32 on the CPU) to ``out``:
    the two step graphs with their weight shards, ``tekken.json`` and ``manifest.json``; return the manifest.

    ``decoder_context`` caps the decoder's attention window (and its KV ring, the page's largest buffer) below
    the model's 8192 tokens; streams shorter than the cap are exact.  ``progress(done, total, what)``.
    """
    onnx, _ = require_onnx()
    if quant not in QUANTS:
        raise VoxtralError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}")
    if model.dtype != torch.float32 or model.device.type != "cpu":
        raise VoxtralError("export needs the model loaded in float32 on the CPU (load(..., device='cpu', "
                           "dtype='f32'))")
    network = model.network
    # the step graphs read plain float weights; a quantized model (.gguf) replaces these modules
    linears = [m for layer in [*network.encoder.layers, *network.decoder.layers]
               for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2)]
    if type(network.decoder.tok_embeddings) is not nn.Embedding or any(type(m) is not nn.Linear for m in linears):
        raise VoxtralError("export needs a floating-point checkpoint (safetensors), not an already quantized one "
                           "(.gguf); pick the precision with --quant")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 7
    done = 0

    def report(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, steps, what)

    audio_graph = AudioStepGraph(network).eval()
    decoder_graph = DecoderStepGraph(network, context=decoder_context, block_bytes=shard_bytes,
                                     separate_embedding=quant in ("q4", "q8")).eval()
    graphs = []
    with tempfile.TemporaryDirectory(prefix="voxtral-onnx-") as scratch, torch.no_grad():
        for module, (spec, example) in ((audio_graph, _audio_spec(audio_graph)),
                                        (decoder_graph, _decoder_spec(decoder_graph))):
            stem = spec.file.removesuffix(".onnx")
            raw = Path(scratch) / spec.file
            inputs, outputs = _export_order(spec)
            _export_graph(module, example, inputs, outputs, raw)
            report(f"exported {spec.file}")
            proto = _load_with_raw_data(onnx, raw)
            if quant == "fp16":
                _to_fp16_storage(onnx, proto)
            elif quant in ("q4", "q8"):
                proto = _quantize(proto, 4 if quant == "q4" else 8)
                _load_raw(proto)
                _embed_from_quantized_head(onnx, proto)
            report(f"quantized {spec.file} ({quant})")
            for old in out.glob(f"{stem}.weights.*"):  # a previous export's shards would be served stale
                old.unlink()
            shards = _save_sharded(onnx, proto, out, stem, shard_bytes)
            graphs.append((spec, shards))
            report(f"wrote {spec.file}")
    shutil.copyfile(model.tokenizer.path, out / "tekken.json")
    _write_vocab(model, out / "vocab.json")
    manifest = _manifest(model, out, graphs, quant, decoder_graph.window)
    report("hashed files")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _write_vocab(model: Any, path: Path) -> None:
    """The bytes of every text token the model can emit, base64, in id order from ``num_special_tokens``: all the
    page needs to turn ids into text (tekken.json is larger and would need a BPE implementation)."""
    import base64

    tok = model.tokenizer
    pieces = [base64.b64encode(tok.token_bytes(i)).decode("ascii")
              for i in range(tok.num_special_tokens, model.config.decoder.vocab_size)]
    path.write_text(json.dumps({"first_id": tok.num_special_tokens, "pieces": pieces}, separators=(",", ":")),
                    encoding="utf-8")


def _load_raw(model: Any) -> None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if not init.HasField("raw_data"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))


def _manifest(model: Any, out: Path, graphs: list[tuple[GraphSpec, list[str]]], quant: str,
              decoder_window: int) -> dict:
    cfg, tok = model.config, model.tokenizer
    audio = cfg.audio
    files = []
    for spec, shards in graphs:
        files += [spec.file, *shards]
    files += ["tekken.json", "vocab.json"]
    return {
        "format": MANIFEST_FORMAT,
        "model": Path(model.source).name,
        "quant": quant,
        "audio": {
            "sample_rate": audio.sample_rate, "hop_length": audio.hop_length, "window_size": audio.window_size,
            "frame_rate": audio.frame_rate, "num_mel_bins": audio.num_mel_bins,
            "global_log_mel_max": audio.global_log_mel_max, "downsample_factor": audio.downsample_factor,
            "transcription_delay_ms": audio.transcription_delay_ms, "n_left_pad_tokens": audio.n_left_pad_tokens,
            "samples_per_step": audio.samples_per_token,
            "step_window": (audio.mel_frames_per_token - 1) * audio.hop_length + audio.window_size,
        },
        "delay": {"default_ms": audio.transcription_delay_ms,
                  "right_pad_extra_tokens": audio.n_right_pad_tokens(0),  # right padding = delay + this
                  "default_tokens": audio.delay_tokens(None), "token_ms": audio.token_ms},
        "encoder": {"window": cfg.encoder.sliding_window, "frames_per_step": audio.downsample_factor},
        "decoder": {"window": decoder_window, "model_window": cfg.decoder.sliding_window,
                    "dim": cfg.decoder.dim, "vocab_size": cfg.decoder.vocab_size},
        "special": {"bos": tok.bos_id, "eos": tok.eos_id, "streaming_pad": tok.streaming_pad_id,
                    "streaming_word": tok.streaming_word_id, "num_special_tokens": tok.num_special_tokens},
        "graphs": {"audio": _graph_entry(graphs[0]), "decoder": _graph_entry(graphs[1])},
        "files": [{"name": f, "bytes": (out / f).stat().st_size, "sha256": _sha256(out / f)} for f in files],
    }


def _graph_entry(graph: tuple[GraphSpec, list[str]]) -> dict:
    spec, shards = graph
    return {"file": spec.file, "weights": shards, "inputs": spec.inputs, "outputs": spec.outputs,
            "state": spec.state}


# -- size arithmetic ---------------------------------------------------------------------------------------------


def estimate_export_bytes(config: Any, quant: str, *, decoder_context: int | None = None) -> dict[str, int]:
    """What :func:`export_web` writes for ``config`` (bytes of graphs + weights, without the tokenizer files) and
    the page's state buffers, computed from the shapes alone: for checkpoints too large to export on this machine.

    Rules, as the exporter applies them: every linear is a MatMul, stored as float32, float16, or MatMulNBits
    (per block of 32 values: 32 * bits / 8 bytes + one float32 scale, symmetric so no zero points); other
    weights (norms, biases, convolutions) stay float32 (float16 in an fp16 export when at least 4 KB); the token
    lookup reads the LM head's weight (tied), so the table is stored once; the front end's DFT and mel matrices
    are constants of the audio graph.
    """
    if quant not in QUANTS:
        raise VoxtralError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}")
    from ..model import VoxtralRealtime

    with torch.device("meta"):
        network = VoxtralRealtime(config)
    bits = {"q4": 4, "q8": 8}.get(quant)

    def matmul(k: int, n: int) -> int:
        if bits:
            return n * -(-k // QUANT_BLOCK) * (QUANT_BLOCK * bits // 8 + 4)
        return k * n * (2 if quant == "fp16" else 4)

    def other(count: int) -> int:
        return 2 * count if quant == "fp16" and 4 * count >= INLINE_BYTES else 4 * count

    def stack(modules: list[nn.Module]) -> int:
        total = 0
        for module in modules:
            for sub in module.modules():
                for name, param in sub.named_parameters(recurse=False):
                    if isinstance(sub, nn.Linear) and name == "weight":
                        total += matmul(sub.in_features, sub.out_features)
                    elif not isinstance(sub, nn.Embedding):
                        total += other(param.numel())
        return total

    audio, dec = config.audio, config.decoder
    n_freq = 1 + audio.window_size // 2
    constants = 4 * (audio.window_size * 2 * n_freq + n_freq * audio.num_mel_bins) + 8 * (
        audio.mel_frames_per_token * audio.window_size)
    audio_bytes = stack([network.encoder, network.adapter]) + constants
    decoder_bytes = stack([network.decoder]) + matmul(dec.dim, dec.vocab_size)
    enc = config.encoder
    window = min(dec.sliding_window, decoder_context or dec.sliding_window)
    state = 4 * (2 * enc.n_layers * enc.n_heads * (enc.sliding_window + audio.downsample_factor - 1) * enc.head_dim
                 + 2 * dec.n_layers * dec.n_kv_heads * window * dec.head_dim)
    return {"audio_graph": audio_bytes, "decoder_graph": decoder_bytes, "download": audio_bytes + decoder_bytes,
            "state": state}


# -- reading an export ------------------------------------------------------------------------------------------------


def read_manifest(folder: str | os.PathLike[str], *, verify: bool = True) -> dict:
    """The manifest of an export folder, with every listed file checked (present, size, and with ``verify`` its
    sha256); a one-line :class:`VoxtralError` otherwise."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise VoxtralError(f"{folder}: no manifest.json (not a `voxtral export web` folder)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        for key in ("audio", "decoder"):
            graph = manifest["graphs"][key]
            if not isinstance(graph["file"], str) or not isinstance(graph["state"], list):
                raise TypeError(f"graphs.{key} lacks its file or state")
    except (ValueError, KeyError, TypeError) as exc:
        raise VoxtralError(f"{path}: not a valid manifest ({first_line(exc)})") from None
    for entry in files:
        f = folder / entry["name"]
        if not f.is_file():
            raise VoxtralError(f"{f}: missing (listed in manifest.json)")
        if f.stat().st_size != entry["bytes"]:
            raise VoxtralError(f"{f}: {f.stat().st_size} bytes, manifest.json says {entry['bytes']}")
        if verify and _sha256(f) != entry["sha256"]:
            raise VoxtralError(f"{f}: sha256 mismatch (corrupted or from another export)")
    return manifest
