"""Scratch: CPU GEMV candidates for the decoder step at full size (one run, same machine)."""
import json, os, sys, time
import numpy as np, torch, onnxruntime as ort
from onnx import helper, TensorProto

SMALL = os.environ.get("SMALL") == "1"
LAYERS = 2 if SMALL else 26
HEAD = 8192 if SMALL else 131072
SHAPES = [("wqkv", 6144, 3072), ("wo", 3072, 4096), ("w13", 18432, 3072), ("w2", 3072, 9216)]
out = open(os.path.join(os.environ.get("OUT", "/tmp"), "cpu_explore.jsonl"), "a")
def emit(**kw):
    print(json.dumps(kw), flush=True); out.write(json.dumps(kw) + "\n"); out.flush()

def bandwidth(threads):
    torch.set_num_threads(threads)
    x = torch.ones(2**30 // 4 * (1 if SMALL else 4))  # 4 GiB
    x.sum()
    best = 1e9
    for _ in range(5):
        t = time.perf_counter(); x.sum(); best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9

def model_bytes(N, K):
    return N * K // 32 * 18

def ort_session(N, K, acc, zp, threads, spin):
    blk = 32
    rng = np.random.default_rng(N + K)
    w = rng.integers(0, 256, (N, K // blk, blk // 2), dtype=np.uint8)
    s = (rng.random((N * K // blk,), dtype=np.float32) * 0.01)
    ins = ["x", "w", "s"]
    inits = [helper.make_tensor("w", TensorProto.UINT8, w.shape, w.tobytes(), raw=True),
             helper.make_tensor("s", TensorProto.FLOAT, s.shape, s.tobytes(), raw=True)]
    if zp:
        z = rng.integers(0, 256, (N * ((K // blk + 1) // 2),), dtype=np.uint8)
        inits.append(helper.make_tensor("z", TensorProto.UINT8, z.shape, z.tobytes(), raw=True)); ins.append("z")
    g = helper.make_graph([helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                                            block_size=blk, accuracy_level=acc)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions(); so.use_per_session_threads = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xin = torch.randn(1, K); yout = torch.empty(1, N)
    io = sess.io_binding()
    io.bind_input("x", "cpu", 0, np.float32, [1, K], xin.data_ptr())
    io.bind_output("y", "cpu", 0, np.float32, [1, N], yout.data_ptr())
    return sess, io, xin, yout

def chain_ort(threads, acc, zp, spin):
    sessions = [ort_session(N, K, acc, zp, threads, spin) for _, N, K in SHAPES] * LAYERS
    sessions.append(ort_session(HEAD, 3072, acc, zp, threads, spin))
    norm = torch.randn(3072)
    def step():
        for sess, io, xin, yout in sessions:
            sess.run_with_iobinding(io)
            torch.nn.functional.rms_norm(norm, (3072,))  # a torch op between, as in the model
    return step

def chain_torch(threads):
    mats = []
    for _, N, K in SHAPES + [("head", HEAD, 3072)] if False else SHAPES:
        pass
    def make(N, K):
        pk = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1)
        return pk, torch.randn(K // 32, N, 2).bfloat16(), torch.randn(1, K).bfloat16()
    per = [make(N, K) for _, N, K in SHAPES]
    mats = per * LAYERS + [make(HEAD, 3072)]
    def step():
        for pk, sz, x in mats:
            torch.ops.aten._weight_int4pack_mm_for_cpu(x, pk, 32, sz)
    return step

def timeit(step, n):
    for _ in range(3): step()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(min(ts))

total = sum(model_bytes(N, K) for _, N, K in SHAPES) * LAYERS + model_bytes(HEAD, 3072)
emit(what="info", torch=torch.__version__, ort=ort.__version__, cpus=os.cpu_count(), step_bytes=total)
threads_list = [int(t) for t in sys.argv[1:]] or [16, 8]
C = ort.capi._pybind_state
C.set_global_thread_pool_sizes(threads_list[0], 1)
for threads in threads_list:
    torch.set_num_threads(threads)
    emit(what="bandwidth", threads=threads, gb_s=bandwidth(threads))
    n = 10
    med, best = timeit(chain_torch(threads), n)
    emit(what="chain", kind="torch_int4pack_bf16", threads=threads, ms=med * 1e3, best_ms=best * 1e3,
         gb_s=total / med / 1e9)
    if threads != threads_list[0]:
        continue  # ORT's global pool is sized once per process
    for acc, zp, spin in ((4, False, True), (4, False, False), (4, True, True), (0, False, True)):
        med, best = timeit(chain_ort(threads, acc, zp, spin), n)
        emit(what="chain", kind=f"ort_matmulnbits_acc{acc}_zp{int(zp)}_spin{int(spin)}", threads=threads,
             ms=med * 1e3, best_ms=best * 1e3, gb_s=total / med / 1e9)

# Encoder-shaped products at several row counts: ORT int8-activation vs torch int4pack vs dense bf16 (oneDNN/AMX)
ENC = [("e_wqkv", 3840, 1280), ("e_wo", 1280, 1280), ("e_w13", 10240, 1280), ("e_w2", 1280, 5120)]
threads = threads_list[0]
torch.set_num_threads(threads)
for M in (1, 4, 16, 64, 256):
    res = {}
    for label, N, K in ENC:
        pk = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1)
        sz = torch.randn(K // 32, N, 2).bfloat16(); xb = torch.randn(M, K).bfloat16()
        wb = torch.randn(N, K).bfloat16()
        sess, _, _, _ = ort_session(N, K, 4, False, threads, True)
        xf = np.random.randn(M, K).astype(np.float32)
        for name, f in (("torch_int4", lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, pk, 32, sz)),
                        ("bf16_dense", lambda: torch.nn.functional.linear(xb, wb))):
            res[name] = res.get(name, 0) + timeit(f, 10)[0]
        res["ort_acc4"] = res.get("ort_acc4", 0) + timeit(lambda: sess.run(None, {"x": xf}), 10)[0]
    emit(what="encoder_products", M=M, threads=threads, ms={k: v * 1e3 for k, v in res.items()})
