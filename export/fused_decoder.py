"""The decoder graph built directly with `onnx.helper` on ONNX Runtime's fused contrib ops (the "fused" layout).

The traced decoder (graphs.DecoderGraph) concatenates past and new keys/values inside the graph every step, so the
runtime rebinds a fresh, one-longer KV tensor per layer per token, and its attention, rotary and norms are dozens of
small ops. This graph is written op by op from the config and a weight getter (state-dict name -> numpy array, so a
streaming export can feed it tensor by tensor), the way onnxruntime-genai's model builder writes its graphs:

- `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` (com.microsoft): residual add + RMSNorm in one op.
- `GroupQueryAttention` (com.microsoft) with a shared past/present buffer: the KV cache is a preallocated
  (B, Hkv, capacity, D) tensor per layer, bound once as both `past_*` and `present_*`; the op writes the new
  positions in place. `seqlens_k` (B,) = total length - 1 and `total_sequence_length` () say where.
- Rotary inside GQA (`do_rotary=1`) from `cos_cache` / `sin_cache` graph inputs: GQA rotates the token at absolute
  cache index P+s by row P+s of the caches. M-RoPE (three position rows, `mrope_section`) is not what GQA computes,
  so the runtime writes the M-RoPE angles of each new token into that row (retrv.runtime.backends.fused); the result
  is exact, not an approximation, as long as every batch row has the same positions (the runtime checks).
- fp32 projections as 1x1 `Conv`s over the tokens laid out as one image row (the "conv form", below), fp16 ones
  as plain MatMul (+ bias Add), named as the traced graph names them (`/language_model/layers.N/...`,
  `/lm_head/MatMul`). `matmul_projections` turns the conv form back into those MatMuls, exactly (a transpose of
  each weight), which is what `retrv quantize` does first, so calibration's rules and every quantize mode find them.

The conv form: x (..., K) -> Reshape (1, 1, T, K) -> Transpose to NCHW (1, K, 1, T) -> Conv with the weight as
(N, K, 1, 1) -> Transpose (1, 1, T, N) -> Reshape (..., N), T = batch x seq. ONNX Runtime's CPU provider turns each
such Conv into its NCHWc convolution (the transposes become channels-last reorders of T x K floats), whose 1x1
kernel streams a decode step's weights faster than MLAS's SGEMM does at M = 1: on the SmolLM2 graft, fp32 decode
8-15% faster, prefill the same on one thread and 5-10% slower on two (docs/ARCHITECTURE.md, "fp32 projections as
1x1 convolutions"). The whole batch
is one image row, so a batch of B sequences reads each weight once, as the MatMul does. NCHWc convolution is
fp32-only, so fp16 graphs (GPU packs) keep MatMul.

Outputs are the traced graph's: logits of the last position only (every caller reads only those; teacher-forced
scoring steps one token at a time) and the pooled `embedding`. No attention mask: the fused graph takes unpadded
batches (the runtime feeds padded embedder batches row by row).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from retrv.export.graphs import GraphSpec, TensorSpec, kv_names
from retrv.model.config import ModelConfig

log = logging.getLogger(__name__)

LAYOUT = "fused"
MS_DOMAIN = "com.microsoft"
OPSET = 18  # the traced graphs' opset; SimplifiedLayerNormalization is an ORT op registered in the ONNX domain
MS_OPSET = 1
CONV_FORM = "/conv_form"  # scope of the conv form's shared shape tensors

WeightGetter = Callable[[str], np.ndarray]


def fused_decoder_spec(cfg: ModelConfig, fdt: str = "float32") -> GraphSpec:
    t = cfg.text
    kv = TensorSpec(fdt, ("batch", t.num_key_value_heads, "capacity", t.head_dim))
    return GraphSpec(
        "decoder",
        inputs={
            "inputs_embeds": TensorSpec(fdt, ("batch", "seq", t.hidden_size)),
            "seqlens_k": TensorSpec("int32", ("batch",)),
            "total_sequence_length": TensorSpec("int32", ()),
            "cos_cache": TensorSpec(fdt, ("capacity", t.head_dim // 2)),
            "sin_cache": TensorSpec(fdt, ("capacity", t.head_dim // 2)),
            **{n: kv for n in kv_names(t.num_hidden_layers, "past")},
        },
        outputs={
            "logits": TensorSpec("float32", ("batch", t.vocab_size)),
            "embedding": TensorSpec("float32", ("batch", t.hidden_size)),
            **{n: kv for n in kv_names(t.num_hidden_layers, "present")},
        },
    )


class _Builder:
    """Nodes and initializers of one graph; names follow the traced exporter's `/module/path/Op` scheme."""

    def __init__(self, weights: WeightGetter, fdt: str, conv: bool = False) -> None:
        self.weights, self.np_dtype, self.conv = weights, np.dtype(fdt), conv
        self.nodes, self.inits = [], []
        # the conv form's own tensors: name -> element type override (None: the graph's float type); not per-position
        self.aux: dict[str, int | None] = {}
        self.consts: dict[tuple, str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | int, name: str, domain: str = "", **attrs):
        from onnx import helper

        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const(self, name: str, values: list[int]) -> str:
        """An int64 vector initializer, made once per value."""
        key = tuple(values)
        if key not in self.consts:
            self.consts[key] = self.init(name, np.array(values, np.int64))
        return self.consts[key]

    def out_shape(self, n: int) -> str:
        """(batch, seq, n) as an int64 shape: inputs_embeds' leading dims (computed once) and n."""
        from onnx import TensorProto

        if ("lead",) not in self.consts:
            self.consts[("lead",)] = self.node("Shape", ["inputs_embeds"], 1, CONV_FORM + "/Shape", end=2)[0]
            self.aux[self.consts[("lead",)]] = TensorProto.INT64
        if ("out", n) not in self.consts:
            n_const = self.const(f"{CONV_FORM}/n_{n}", [n])
            self.consts[("out", n)] = self.node("Concat", [self.consts[("lead",)], n_const], 1,
                                                f"{CONV_FORM}/Concat_{n}", axis=0)[0]
            self.aux[self.consts[("out", n)]] = TensorProto.INT64
        return self.consts[("out", n)]

    def matmul(self, x: str, w: np.ndarray, key: str, scope: str, rank: int = 3) -> str:
        """x @ w for a (K, N) weight `w` (the state-dict weight transposed): a MatMul named `{scope}/MatMul`, or in
        the conv form the five nodes that `matmul_projections` folds back into exactly that MatMul. `key` names
        the weight initializer (`key + ".T"` as MatMul's (K, N), `key` as Conv's (N, K, 1, 1)); `rank` is x's."""
        out = f"{scope}/MatMul/output_0"
        if not self.conv:
            return self.node("MatMul", [x, self.init(key + ".T", w.astype(self.np_dtype))], [out], f"{scope}/MatMul")[0]
        k, n = w.shape
        conv_w = self.init(key, np.ascontiguousarray(w.T).astype(self.np_dtype)[:, :, None, None])
        (row,) = self.node("Reshape", [x, self.const(f"{CONV_FORM}/row_{k}", [1, 1, -1, k])], 1, f"{scope}/Reshape")
        (nchw,) = self.node("Transpose", [row], 1, f"{scope}/Transpose", perm=[0, 3, 1, 2])
        (y,) = self.node("Conv", [nchw, conv_w], 1, f"{scope}/Conv")
        (nhwc,) = self.node("Transpose", [y], 1, f"{scope}/Transpose_1", perm=[0, 2, 3, 1])
        shape = self.out_shape(n) if rank == 3 else self.const(f"{CONV_FORM}/rows_{n}", [-1, n])
        self.aux.update(dict.fromkeys((row, nchw, y, nhwc)))
        return self.node("Reshape", [nhwc, shape], [out], f"{scope}/Reshape_1")[0]

    def weight(self, key: str) -> str:
        return self.init(key, np.asarray(self.weights(key)).astype(self.np_dtype))

    def skip_norm(self, x: str, skip: str, gamma: str, name: str, eps: float) -> tuple[str, str]:
        """RMSNorm(x + skip) and x + skip (the next residual); the op's mean / inv_std_var outputs are not asked for."""
        out = [f"{name}/output_0", "", "", f"{name}/output_3"]
        self.node("SkipSimplifiedLayerNormalization", [x, skip, self.weight(gamma)], out, name, domain=MS_DOMAIN,
                  epsilon=eps)
        return out[0], out[3]

    def packed_linear(self, x: str, prefixes: list[str], fused: str, bias: bool = True) -> str:
        """x @ [W_1; W_2; ...]^T (+ [b_1; b_2; ...]): one MatMul for projections that read the same input."""
        scope = "/" + fused.replace(".layers.", "/layers.").replace(".", "/").replace("/layers/", "/layers.")
        w = np.concatenate([np.asarray(self.weights(f"{p}.weight")).T for p in prefixes], axis=1)
        y = self.matmul(x, w, f"{fused}.weight", scope)
        if bias:
            b = np.concatenate([np.asarray(self.weights(f"{p}.bias")) for p in prefixes])
            (y,) = self.node("Add", [y, self.init(f"{fused}.bias", b.astype(self.np_dtype))], 1, f"{scope}/Add")
        return y

    def linear(self, x: str, prefix: str, bias: bool) -> str:
        """x @ W^T (+ b): `prefix` is the state-dict prefix ("language_model.layers.0.self_attn.q_proj")."""
        scope = "/" + prefix.replace(".layers.", "/layers.").replace(".", "/").replace("/layers/", "/layers.")
        y = self.matmul(x, np.asarray(self.weights(prefix + ".weight")).T, prefix + ".weight", scope)
        if bias:
            (y,) = self.node("Add", [y, self.weight(prefix + ".bias")], 1, f"{scope}/Add")
        return y


def build_fused_decoder(cfg: ModelConfig, weights: WeightGetter, fdt: str = "float32", fuse_qkv: bool = True,
                        fuse_mlp: bool = True, conv: bool | None = None):
    """The fused decoder as an onnx.ModelProto. `weights(name)` returns the state-dict tensor `name` as numpy
    (e.g. "language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight").

    `fuse_qkv`: one q/k/v MatMul (+ one bias Add) per layer feeding GQA's packed-QKV input; `fuse_mlp`: one gate/up
    MatMul, split after. Both on by default: at decode a projection of SmolLM2's width is a few microseconds of
    weights behind each kernel launch and thread-pool fork, so fewer, wider MatMuls are faster (INT8 decode 11%
    faster on two threads, 4% on one; bench/fused_decode.py, docs/ARCHITECTURE.md). `conv`: the projections in
    the conv form (module docstring); default: for fp32 graphs, the only ones ONNX Runtime's NCHWc kernels take."""
    from onnx import TensorProto, helper

    t = cfg.text
    spec = fused_decoder_spec(cfg, fdt)
    b = _Builder(weights, fdt, conv=np.dtype(fdt) == np.float32 if conv is None else conv)
    eps = float(t.rms_norm_eps)
    lm = "language_model"
    x = "inputs_embeds"
    (normed,) = b.node("SimplifiedLayerNormalization", [x, b.weight(f"{lm}.layers.0.input_layernorm.weight")], 1,
                       f"/{lm}/layers.0/input_layernorm/SimplifiedLayerNormalization", axis=-1, epsilon=eps)
    residual = x
    for i in range(t.num_hidden_layers):
        p = f"{lm}.layers.{i}"
        scope = f"/{lm}/layers.{i}"
        if fuse_qkv:  # one MatMul, GQA's packed-QKV input
            q, k, v = b.packed_linear(normed, [f"{p}.self_attn.{n}_proj" for n in "qkv"],
                                      f"{p}.self_attn.qkv_proj"), "", ""
        else:
            q = b.linear(normed, f"{p}.self_attn.q_proj", bias=True)
            k = b.linear(normed, f"{p}.self_attn.k_proj", bias=True)
            v = b.linear(normed, f"{p}.self_attn.v_proj", bias=True)
        attn, _, _ = b.node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache"],
            [f"{scope}/self_attn/GroupQueryAttention/output_0", f"present_key_{i}", f"present_value_{i}"],
            f"{scope}/self_attn/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=t.num_attention_heads, kv_num_heads=t.num_key_value_heads, do_rotary=1, rotary_interleaved=0,
        )
        o = b.linear(attn, f"{p}.self_attn.o_proj", bias=False)
        normed, residual = b.skip_norm(o, residual, f"{p}.post_attention_layernorm.weight",
                                       f"{scope}/post_attention_layernorm/SkipSimplifiedLayerNormalization", eps)
        if fuse_mlp:  # one MatMul for gate and up, split after
            gu = b.packed_linear(normed, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj", bias=False)
            gate, up = b.node("Split", [gu], 2, f"{scope}/mlp/Split", axis=-1, num_outputs=2)
        else:
            gate = b.linear(normed, f"{p}.mlp.gate_proj", bias=False)
            up = b.linear(normed, f"{p}.mlp.up_proj", bias=False)
        (sig,) = b.node("Sigmoid", [gate], 1, f"{scope}/mlp/act_fn/Sigmoid")
        (silu,) = b.node("Mul", [gate, sig], 1, f"{scope}/mlp/act_fn/Mul")
        (h,) = b.node("Mul", [silu, up], 1, f"{scope}/mlp/Mul")
        mlp = b.linear(h, f"{p}.mlp.down_proj", bias=False)
        if i + 1 < t.num_hidden_layers:
            nxt = f"{lm}.layers.{i + 1}.input_layernorm"
            normed, residual = b.skip_norm(mlp, residual, f"{nxt}.weight",
                                           f"/{lm}/layers.{i + 1}/input_layernorm/SkipSimplifiedLayerNormalization",
                                           eps)
    # (B, S, X): every layer tensor but the conv form's own, for the quantizers
    per_position = {o for n in b.nodes for o in n.output if o and o not in b.aux}
    # Only the last position is read (logits, embedding): slice before the final norm, norm one row per sequence.
    starts, ends, axis = (b.init(n, np.array([v], np.int64)) for n, v in
                          (("last_start", -1), ("last_end", np.iinfo(np.int64).max), ("seq_axis", 1)))
    (mlp_last,) = b.node("Slice", [mlp, starts, ends, axis], 1, f"/{lm}/Slice_mlp_last")  # (B, 1, H)
    (res_last,) = b.node("Slice", [residual, starts, ends, axis], 1, f"/{lm}/Slice_residual_last")
    (hidden,) = b.node("SkipSimplifiedLayerNormalization", [mlp_last, res_last, b.weight(f"{lm}.norm.weight")],
                       [f"/{lm}/norm/output_0"], f"/{lm}/norm/SkipSimplifiedLayerNormalization",
                       domain=MS_DOMAIN, epsilon=eps)
    (hidden,) = b.node("Squeeze", [hidden, axis], 1, f"/{lm}/Squeeze")  # (B, H)
    logits = b.matmul(hidden, np.asarray(b.weights("lm_head.weight")).T, "lm_head.weight", "/lm_head", rank=2)
    b.node("Cast", [logits], ["logits"], "/lm_head/Cast", to=TensorProto.FLOAT)
    (h32,) = b.node("Cast", [hidden], 1, "/embedding/Cast", to=TensorProto.FLOAT)
    axes = b.init("embedding_axes", np.array([-1], np.int64))
    (norm,) = b.node("ReduceL2", [h32, axes], 1, "/embedding/ReduceL2", keepdims=1)
    floor = b.init("embedding_floor", np.array(1e-12, np.float32))  # pooled_embedding's clamp_min
    (norm,) = b.node("Max", [norm, floor], 1, "/embedding/Max")
    b.node("Div", [h32, norm], ["embedding"], "/embedding/Div")

    def value_info(name: str, ts: TensorSpec):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(ts.dtype))
        return helper.make_tensor_value_info(name, elem, list(ts.shape))

    # Every intermediate's element type, declared: onnx's shape inference does not know the contrib ops (nor
    # SimplifiedLayerNormalization), and the quantizers (int8-dynamic, int8-static) need the MatMul inputs' types.
    # The layers' tensors also declare their rank (batch, seq, features): the INT4 offset form's block sums reshape
    # by rank (calibration.matrix.offset_nodes) instead of computing each shape at run time.
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(fdt))
    fp32_outputs = {"/embedding/Cast/output_0", "/embedding/ReduceL2/output_0", "/embedding/Max/output_0"}
    declared = {*spec.inputs, *spec.outputs}
    inner = [helper.make_tensor_value_info(o, TensorProto.FLOAT if o in fp32_outputs else b.aux.get(o) or elem,
                                           ["batch", "seq", None] if o in per_position else None)
             for n in b.nodes for o in n.output if o and o not in declared]
    graph = helper.make_graph(
        b.nodes, "retrv_fused_decoder",
        [value_info(n, s) for n, s in spec.inputs.items()],
        [value_info(n, s) for n, s in spec.outputs.items()],
        initializer=b.inits, value_info=inner,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(MS_DOMAIN, MS_OPSET)],
                              producer_name="retrv.export.fused_decoder")
    model.ir_version = 9  # ONNX Runtime 1.16+ reads IR 9 (opset 18 needs IR >= 8)
    return model


def save_fused_decoder(model, path: Path) -> list[Path]:
    """Write `model` to `path` (weights in `path.data` above onnx_export.EXTERNAL_DATA_THRESHOLD). Returns the files."""
    from retrv.export.onnx_export import save_model

    files, weight_bytes = save_model(model, path)
    log.info("wrote fused %s (%.1f MB of weights)", path.name, weight_bytes / 1e6)
    return files


def matmul_projections(model) -> int:
    """Fold every conv-form projection of `model` (an onnx.ModelProto, weights loaded) back into the MatMul the
    builder writes without it: same node name (`{scope}/MatMul`), same output, the weight transposed to (K, N) as
    `{key}.T`. Exact (the weights move, no arithmetic). The conv form's shape tensors go with the last of their
    users. Returns how many projections were folded; a graph without the form is left as it is."""
    from onnx import helper, numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}

    def only_consumer(name: str, op: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def perm(node) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])

    replace, drop = {}, set()
    for conv in g.node:
        w = inits.get(conv.input[1]) if conv.op_type == "Conv" and len(conv.input) == 2 else None
        if w is None or len(w.dims) != 4 or tuple(w.dims[2:]) != (1, 1) or conv.attribute:
            continue
        nchw = producer.get(conv.input[0])
        row = producer.get(nchw.input[0]) if nchw is not None and nchw.op_type == "Transpose" else None
        nhwc = only_consumer(conv.output[0], "Transpose")
        back = only_consumer(nhwc.output[0], "Reshape") if nhwc is not None else None
        target = inits.get(row.input[1]) if row is not None and row.op_type == "Reshape" else None
        if target is None or numpy_helper.to_array(target).tolist() != [1, 1, -1, w.dims[1]] or back is None \
                or perm(nchw) != [0, 3, 1, 2] or perm(nhwc) != [0, 2, 3, 1] \
                or len(consumers.get(nchw.output[0], [])) != 1:
            continue
        scope = conv.name.removesuffix("/Conv")
        key = w.name + ".T"
        if key not in inits:  # once per weight, however many projections share it
            inits[key] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w)[:, :, 0, 0].T), key)
            g.initializer.append(inits[key])  # (K, N)
        replace[id(back)] = helper.make_node("MatMul", [row.input[0], key], [back.output[0]], name=f"{scope}/MatMul")
        drop.update(id(n) for n in (row, nchw, conv, nhwc))
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    # Dead shape tensors (the shared Shape / Concat, Reshape targets) and unused initializers go.
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    used = {i for n in nodes for i in n.input}
    made = {o for n in nodes for o in n.output}
    kept_inits = [t for t in g.initializer if t.name in used]
    kept_info = [v for v in g.value_info if v.name in made]
    del g.node[:], g.initializer[:], g.value_info[:]
    g.node.extend(nodes)
    g.initializer.extend(kept_inits)
    g.value_info.extend(kept_info)
    return len(replace)


def module_weights(model) -> WeightGetter:
    """A weight getter over a loaded `Qwen2_5_VL` (fp32 or fp16): state-dict name -> numpy."""
    state = model.state_dict()

    def get(name: str) -> np.ndarray:
        return state[name].detach().cpu().numpy()

    return get


# ------------------------------------------------------------------------------------------------------- validation
def _validation_chunks(batch: int, extend: bool) -> list[np.ndarray]:
    """(3, B, S) position ids of each call: a prefill whose middle tokens carry image-style M-RoPE positions
    (the three rows differ), then single-token decode steps, then (batch 1 only: GQA extends a cache with several
    new tokens for one sequence only) a 3-token extension."""
    image = np.array([[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]], np.int64)
    chunks = [np.repeat(image[:, None], batch, axis=1)]
    nxt = 5
    for _ in range(4):
        chunks.append(np.full((3, batch, 1), nxt, np.int64))
        nxt += 1
    if extend:
        chunks.append(np.repeat(np.arange(nxt, nxt + 3)[None, None], 3, 0).repeat(batch, 1).astype(np.int64))
    return chunks


def validate_fused(path: Path, cfg: ModelConfig, oracle, precision: str = "fp32", seed: int = 0) -> dict:
    """Run the fused graph at `path` through the runtime's own cache code (FusedCache, mrope_angles) and the
    PyTorch decoder `oracle` (graphs.DecoderGraph over the fp32 model) call by call on real token embeddings:
    prefill with image M-RoPE positions, decode steps, an extension. Raise `ExportValidationError` on the first
    logits/embedding output whose max abs difference exceeds the precision's tolerance x its scale."""
    import onnxruntime as ort

    from retrv.export.graphs import decoder_spec, run_torch
    from retrv.export.onnx_export import TOLERANCE, ExportValidationError
    from retrv.runtime.backends.fused import FusedCache, mrope_angles

    t = cfg.text
    fdt = np.dtype("float16" if precision == "fp16" else "float32")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    spec, tol = decoder_spec(cfg), TOLERANCE[precision]
    rng = np.random.default_rng(seed)
    # Real token embeddings, not N(0, 1) draws: on the real SmolLM2 graft, unit-variance inputs (10x the table's
    # scale) push 30 layers' activations where fp32 reassociation alone reaches 3e-4 of the logits' scale.
    table = oracle.language_model.embed_tokens.weight.detach().float().numpy()
    worst: dict[str, float] = {}
    calls, shapes = 0, []
    for batch, extend in ((2, False), (1, True)):
        cache = FusedCache.allocate(batch, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, fdt,
                                    t.max_position_embeddings, capacity=8)  # 8: the run regrows the buffers once
        past = {f"past_{kind}_{i}": np.zeros((batch, t.num_key_value_heads, 0, t.head_dim), np.float32)
                for i in range(t.num_hidden_layers) for kind in ("key", "value")}
        length = 0
        shapes.append({"batch": batch, "new_per_call": [int(p.shape[2]) for p in _validation_chunks(batch, extend)]})
        for pos in _validation_chunks(batch, extend):
            s = pos.shape[2]
            embeds = table[rng.integers(0, t.vocab_size, (batch, s))]  # (B, S, H) real token embeddings
            want = run_torch(oracle, spec, {"inputs_embeds": embeds, "position_ids": pos,
                                            "attention_mask": np.ones((batch, length + s), np.int64), **past})
            past = {k.replace("present_", "past_"): v for k, v in want.items() if k.startswith("present_")}
            cache.reserve(length, length + s)
            cache.write_rotary(length, mrope_angles(pos, t))
            feed = {"inputs_embeds": embeds.astype(fdt), "seqlens_k": np.full((batch,), length + s - 1, np.int32),
                    "total_sequence_length": np.array(length + s, np.int32), "cos_cache": cache.cos,
                    "sin_cache": cache.sin}
            for i in range(t.num_hidden_layers):
                feed[f"past_key_{i}"], feed[f"past_value_{i}"] = cache.keys[i], cache.values[i]
            names = ["logits", "embedding"] + [f"present_{k}_{i}" for i in range(t.num_hidden_layers)
                                               for k in ("key", "value")]
            got = dict(zip(names, sess.run(names, feed)))
            for i in range(t.num_hidden_layers):  # the runtime binds these in place; here they come back as copies
                cache.keys[i][...], cache.values[i][...] = got[f"present_key_{i}"], got[f"present_value_{i}"]
            length += s
            calls += 1
            for name in ("logits", "embedding"):
                ref, out = want[name], got[name].astype(np.float32)
                diff = float(np.abs(out - ref).max())
                limit = tol * max(1.0, float(np.abs(ref).max()))
                if not diff <= limit:  # also catches NaN
                    raise ExportValidationError(
                        f"{path.name} (fused) output '{name}': max abs diff {diff:.3g} exceeds {limit:.3g} "
                        f"({precision} tolerance) at call {calls} (batch {batch}, {length - s} cached + {s} new)")
                worst[name] = max(worst.get(name, 0.0), diff)
    # A decoder that ignored its cache would still match the prefill calls: the last call again with the cache
    # contents negated must give other logits.
    feed.update({k: (-v).astype(v.dtype) for k, v in feed.items() if k.startswith("past_")})
    if np.allclose(sess.run(["logits"], feed)[0], got["logits"], atol=1e-6):
        raise ExportValidationError(f"{path.name} (fused): logits do not depend on the KV buffer; expected a graph "
                                    f"that reads its cache")
    return {"layout": LAYOUT, "calls": calls, "shapes": shapes, "max_abs_diff": worst, "tolerance": tol,
            "uses_cache": True}
