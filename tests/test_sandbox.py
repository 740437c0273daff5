"""The sandbox (:mod:`metarl.sandbox`), through the drift family's side of it
(:mod:`metarl.families.drift.proposal`): untrusted drift source runs in an isolated child
process. The last tests call the generic :class:`~metarl.sandbox.Sandbox` directly.

Every test starts real child processes. The fork server (which imports torch) starts once
for the whole file; each sandbox after that costs a fork (~20 ms).
"""

import fcntl
import os
import pickle
import socket
import textwrap
import time

import numpy as np
import pytest
import torch

import metarl.inner.ppo as ppo
from metarl.families.drift import PPOClip
from metarl.families.drift.proposal import DriftSandbox, SandboxedDrift, validate_drift
from metarl.sandbox import ProposalError, Sandbox, SandboxLimits, core
from metarl.sandbox import forkserver as sb

ROOT = os.geteuid() == 0
PPO_CLIP_SOURCE = textwrap.dedent("""\
    import torch

    def drift(ratio, advantage, clip_eps):
        return torch.relu((ratio - torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)) * advantage)
""")


def src(body: str) -> str:
    return textwrap.dedent(body)


def load_error(code: str, limits: SandboxLimits | None = None) -> ProposalError:
    """The ProposalError that starting a sandbox with ``code`` raises."""
    box = DriftSandbox(code, limits)
    with pytest.raises(ProposalError) as info:
        box.start()
    assert not box.running and not os.path.exists(box.workdir)  # closed and cleaned up
    return info.value


def call_error(code: str, limits: SandboxLimits | None = None) -> ProposalError:
    """The ProposalError that the first call of ``code``'s drift raises."""
    with DriftSandbox(code, limits) as box:
        with pytest.raises(ProposalError) as info:
            box.drift(np.ones(4), np.ones(4), 0.2)
    return info.value


def validation_error(code: str) -> ProposalError:
    with DriftSandbox(code) as box:
        with pytest.raises(ProposalError) as info:
            validate_drift(box.drift)
    return info.value


@pytest.fixture(scope="module")
def ppo_box():
    with DriftSandbox(PPO_CLIP_SOURCE) as box:
        yield box


# -- a good proposal -----------------------------------------------------------------------


def test_good_drift_equals_ppo_clip_values_and_gradient(ppo_box):
    gen = torch.Generator().manual_seed(0)
    ratio = torch.exp(0.5 * torch.randn(4, 257, generator=gen))  # [P, B], as in training
    adv = 3 * torch.randn(4, 257, generator=gen)
    r = ratio.clone().requires_grad_(True)
    expected = PPOClip()(r, adv, 0.2)
    (expected_grad,) = torch.autograd.grad(expected.sum(), r)

    drift, grad = ppo_box.drift(ratio, adv, 0.2)
    assert drift.shape == grad.shape == (4, 257) and drift.dtype == np.float32
    np.testing.assert_allclose(drift, expected.detach().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad, expected_grad.numpy(), rtol=0, atol=1e-6)
    assert (grad != 0).any() and (drift > 0).any()  # the comparison is not vacuous
    validate_drift(ppo_box.drift)  # passes: raises nothing
    assert ppo_box.function == "drift"


def test_sandboxed_drift_backward_and_device_dtype(ppo_box):
    d = SandboxedDrift(ppo_box)
    assert d.name == "code" and d.num_meta_params == 0
    ratio = torch.tensor([[0.5, 1.0, 1.5], [0.7, 1.1, 2.0]], dtype=torch.float64,
                         requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 1.0, -1.0]], dtype=torch.float64)
    out = d.population(torch.zeros(2, 0), ratio, adv, 0.2)
    assert out.dtype == torch.float64 and out.shape == (2, 3)
    weights = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    (g,) = torch.autograd.grad((out * weights).sum(), ratio)
    r = ratio.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((PPOClip()(r, adv, 0.2) * weights).sum(), r)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-6)


def test_sandboxed_drift_trains_like_ppo_clip(ppo_box, tiny_cartpole):
    seeds = [0, 1]
    reference = ppo.train(tiny_cartpole, "ppo-clip", seeds=seeds)
    result = ppo.train(tiny_cartpole, SandboxedDrift(ppo_box), seeds=seeds)
    assert result.drift == "code" and not result.failed.any()
    # Same float32 inputs, same formula: the drift values agree exactly, and so does the
    # gradient here (the child's grad_output * d drift/d ratio equals the parent's autograd
    # chain for this drift). The tolerances leave room for a different rounding order of
    # that product on other builds (~1 ulp per step); a wrong drift or gradient moves the
    # parameters by ~lr = 2.5e-4 per step and the returns by whole episodes.
    torch.testing.assert_close(result.agent_params, reference.agent_params, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.curve, reference.curve, rtol=0, atol=1e-3)
    assert not torch.equal(result.agent_params,
                           ppo.train(tiny_cartpole, "dpo", seeds=seeds).agent_params)


def test_isolation_as_reported_and_as_seen_from_inside():
    probe = src("""
        import os

        def drift(ratio, advantage, clip_eps):
            with open("/proc/self/status") as f:
                uid = [line for line in f if line.startswith("Uid:")][0].split()
            with open("/proc/self/limits") as f:
                limits = [" ".join(line.split()) for line in f]
            raise RuntimeError(f"uid={uid[1]} netns={os.readlink('/proc/self/ns/net')} "
                               f"env={sorted(os.environ)} cwd={os.getcwd()} {limits}")
    """)
    limits = SandboxLimits(cpu_s=77, memory_mb=3000, nproc=33, open_files=55)
    with DriftSandbox(probe, limits) as box:
        iso = box.isolation
        workdir = box.workdir
        with pytest.raises(ProposalError) as info:
            box.drift(np.ones(3), np.ones(3), 0.2)
        assert box.running  # an exception in the proposal leaves the child usable
    msg = info.value.message
    assert info.value.reason == "runtime" and "RuntimeError" in msg
    assert "env=['HOME', 'LANG', 'OMP_NUM_THREADS', 'PATH', 'TMPDIR']" in msg
    assert f"cwd={workdir}" in msg and not os.path.exists(workdir)
    # The OS-level limits are in force inside the child.
    for line in ("Max cpu time 77 82 seconds", f"Max address space {3000 << 20} {3000 << 20} "
                 "bytes", "Max processes 33 33 processes", "Max open files 55 55 files",
                 "Max core file size 0 0 bytes"):
        assert line in msg, msg
    assert iso["audit_hook"] == "installed"
    if ROOT:
        assert iso["network"] == "namespace" and iso["user"] == "nobody"
        assert "uid=65534" in msg
        assert f"netns={os.readlink('/proc/self/ns/net')}" not in msg
        assert iso["tmp"].startswith("private tmpfs on /tmp")


def test_limits_are_validated():
    with pytest.raises(ValueError, match="call_timeout_s"):
        SandboxLimits(call_timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=100)
    with pytest.raises(ValueError, match="nproc"):
        SandboxLimits(nproc=1.5)
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=float("inf"))
    with pytest.raises(TypeError):
        DriftSandbox(b"def drift(r, a, e): return r")
    with pytest.raises(ValueError, match="memory_mb=600 is too small"):
        DriftSandbox(PPO_CLIP_SOURCE, SandboxLimits(memory_mb=600)).start()


# -- proposals that do not load ------------------------------------------------------------


@pytest.mark.parametrize("code, reason, words", [
    ("import torch\n\ndef drift(ratio, advantage, clip_eps)\n    return ratio\n",
     "syntax", ["SyntaxError at line 3", "def drift(ratio, advantage, clip_eps)"]),
    ("import torch\nscale = 2.0\n", "signature", ["exactly one top-level function", "found 0"]),
    ("def helper(x):\n    return x\n\ndef drift(r, a, e):\n    return helper(r)\n",
     "signature", ["found 2 (helper, drift)"]),
    ("def drift(ratio, advantage):\n    return ratio\n",
     "signature", ["exactly three parameters", "drift(ratio, advantage)"]),
    ("def drift(ratio, advantage, clip_eps):\n    return ratio\n\nraise ValueError('top')\n",
     "runtime", ["top-level code raised", "ValueError: top", 'File "<proposal>", line 4']),
])
def test_proposals_that_do_not_load(code, reason, words):
    e = load_error(code)
    assert e.reason == reason, e.message
    for w in words:
        assert w in e.message, e.message


# -- proposals that load but fail when called or validated ---------------------------------


def test_exception_inside_the_function_has_its_traceback():
    code = src("""
        import torch

        def drift(ratio, advantage, clip_eps):
            scale = 1.0 / (clip_eps - clip_eps)
            return ratio * scale
    """)
    e = call_error(code)
    assert e.reason == "runtime"
    assert "ZeroDivisionError" in e.message and 'File "<proposal>", line 5' in e.message
    assert "scale = 1.0 / (clip_eps - clip_eps)" in e.message  # the source line is shown
    assert "sandbox/child.py" not in e.message  # the harness's own frames are dropped


def test_wrong_shape_is_reported():
    e = call_error("import torch\n\ndef drift(r, a, e):\n    return (r * a).sum()\n")
    assert e.reason == "shape" and "shape" in e.message and "(4,)" in e.message


@pytest.mark.parametrize("body, reason, words", [
    ("return torch.log(ratio - 1.0) ** 2", "nan", ["NaN or infinite"]),
    ("return (ratio - 1.0) ** 2 - 0.5 * torch.relu(-advantage) * (ratio - 1.0) ** 2",
     "constraint", ["non-negative", "negative at"]),
    ("return (ratio - 1.0) ** 2 + 0.01", "constraint", ["zero at r = 1"]),
    ("return torch.where(ratio >= 1, ratio - 1.0, (ratio - 1.0) ** 2)", "constraint",
     ["flat at r = 1", "it is 1"]),
    ("return (ratio - 1.0) ** 2 * advantage.abs().mean()", "constraint", ["elementwise"]),
])
def test_validation_failures(body, reason, words):
    e = validation_error(f"import torch\n\ndef drift(ratio, advantage, clip_eps):\n"
                         f"    {body}\n")
    assert e.reason == reason, e.message
    for w in words:
        assert w in e.message, e.message


def test_endless_loop_in_the_function_times_out():
    code = "def drift(ratio, advantage, clip_eps):\n    while True:\n        pass\n"
    e = call_error(code, SandboxLimits(call_timeout_s=2))
    assert e.reason == "timeout" and "call_timeout_s=2" in e.message


def test_endless_loop_at_top_level_times_out():
    code = "def drift(ratio, advantage, clip_eps):\n    return ratio\n\nwhile True:\n    pass\n"
    e = load_error(code, SandboxLimits(start_timeout_s=2))
    assert e.reason == "timeout" and "start_timeout_s=2" in e.message


def test_wall_time_limit_kills_an_idle_sandbox():
    with DriftSandbox(PPO_CLIP_SOURCE, SandboxLimits(wall_s=2)) as box:
        box.drift(np.ones(2), np.ones(2), 0.2)  # fine while young
        time.sleep(2.3)
        with pytest.raises(ProposalError) as info:
            box.drift(np.ones(2), np.ones(2), 0.2)
    assert info.value.reason == "timeout" and "wall_s=2" in info.value.message


def test_cpu_limit_kills_a_busy_proposal():
    code = "def drift(ratio, advantage, clip_eps):\n    while True:\n        pass\n"
    e = call_error(code, SandboxLimits(cpu_s=1, call_timeout_s=30))
    assert e.reason == "cpu" and "cpu_s=1" in e.message


@pytest.mark.parametrize("bomb", [
    "x = bytearray(50 * 2**30)",
    "x = []\n    while True:\n        x.append(bytearray(2**24))",
])
def test_memory_bombs(bomb):
    limit = int(sb._fork_server(60).footprint_mb) + 400
    code = f"def drift(ratio, advantage, clip_eps):\n    {bomb}\n    return ratio\n"
    e = call_error(code, SandboxLimits(memory_mb=limit, call_timeout_s=30))
    assert e.reason == "memory", e.message
    assert "MemoryError" in e.message


# -- proposals that misbehave --------------------------------------------------------------


def test_process_creation_is_forbidden():
    code = src("""
        import os
        errors = []
        for attempt in ("os.fork()", "os.system('touch forked')",
                        "__import__('subprocess').Popen(['true'])",
                        "os.execv('/bin/true', ['true'])"):
            try:
                for _ in range(100):
                    eval(attempt)
            except Exception as e:
                errors.append(f"{attempt} -> {e}")

        def drift(ratio, advantage, clip_eps):
            return ratio
        raise RuntimeError(" | ".join(errors))
    """)
    e = load_error(code)
    assert e.reason == "forbidden"
    assert e.message.startswith("forbidden: starting processes (os.fork)")
    assert "os.system('touch forked') -> forbidden: starting processes (os.system)" in e.message
    assert "importing 'subprocess' is not allowed" in e.message
    assert "os.execv('/bin/true', ['true']) -> forbidden: starting processes (os.exec)" \
        in e.message


def test_network_is_forbidden():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.settimeout(0.5)
    code = src(f"""
        def drift(ratio, advantage, clip_eps):
            errors = []
            try:
                import socket
            except Exception as e:
                errors.append(str(e))
            # A way around the import check: the socket type is still in memory.
            sock_type = [c for c in object.__subclasses__() if c.__name__ == "socket"][0]
            try:
                s = sock_type()
                s.connect(("127.0.0.1", {port}))
                s.sendall(b"leak")
            except Exception as e:
                errors.append(str(e))
            raise RuntimeError(" | ".join(errors))
    """)
    try:
        e = call_error(code)
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected
    finally:
        server.close()
    assert e.reason == "forbidden"
    assert e.message.startswith("forbidden: importing 'socket' is not allowed")
    assert "forbidden: network access (socket.__new__)" in e.message


def test_cannot_write_outside_its_working_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    shared = f"/tmp/metarl-sandbox-test-{os.getpid()}.txt"
    code = src(f"""
        import os
        results = []
        for path in ({str(target)!r}, {shared!r}, "../escaped.txt"):
            try:
                with open(path, "w") as f:
                    f.write("escaped")
                results.append(path + " written")
            except Exception as e:
                results.append(path + " " + str(e))
        try:
            fd = os.open("/", os.O_RDONLY)
            os.open({str(target)[1:]!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        except Exception as e:
            results.append(str(e))
        with open("inside.txt", "w") as f:  # the working directory is writable
            f.write("fine")

        def drift(ratio, advantage, clip_eps):
            return ratio
        raise RuntimeError(" | ".join(results))
    """)
    e = load_error(code)
    assert e.reason == "forbidden" and "only the working directory is writable" in e.message
    assert f"os.open of the relative path '{str(target)[1:]}'" in e.message
    assert "written" not in e.message
    assert not target.exists() and not os.path.exists(shared)
    assert list(tmp_path.iterdir()) == []


def test_cannot_read_the_api_key(monkeypatch):
    secret = "sk-test-SECRET-123"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    code = src(f"""
        import os

        seen = [repr(dict(os.environ))]
        for pid in (os.getppid(), {os.getpid()}, 1):
            try:
                with open(f"/proc/{{pid}}/environ", "rb") as f:
                    seen.append(f.read().decode(errors="replace"))
            except Exception as e:
                seen.append(f"{{pid}}: {{e}}")
        print("SEEN", seen)

        def drift(ratio, advantage, clip_eps):
            return ratio
        raise RuntimeError("SEEN " + " | ".join(seen))
    """)
    box = DriftSandbox(code)
    with pytest.raises(ProposalError) as info:
        box.start()
    e = info.value
    assert "SEEN" in e.message and "SEEN" in e.output  # the attempt ran and was reported
    assert e.reason == "forbidden" and "another process's /proc entry" in e.message
    for text in (e.message, e.output, str(e), box.output):
        assert secret not in text


def test_cannot_change_its_own_fitness(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_before = ppo.train
    code = src(f"""
        import os

        notes = []
        try:
            import metarl.inner.ppo as ppo
            ppo.train = lambda *a, **k: "patched"  # only this child's copy, if any
            notes.append("patched its own copy")
        except Exception as e:
            notes.append(repr(e))
        for pid in (os.getppid(), {os.getpid()}):
            try:
                with open(f"/proc/{{pid}}/cwd/archive.json", "w") as f:
                    f.write('{{"fitness": 1000}}')
            except Exception as e:
                notes.append(repr(e))
        print("Fitness: 1000")

        def drift(ratio, advantage, clip_eps):
            return ratio
        raise RuntimeError(" | ".join(notes))
    """)
    e = load_error(code)
    assert e.reason == "forbidden" and "another process's /proc entry" in e.message
    # Whether the child could import metarl at all depends on where it is installed (the
    # worker runs as nobody); either way only the child's copy could change:
    assert ppo.train is train_before
    assert not (tmp_path / "archive.json").exists()
    assert "Fitness: 1000" in e.output  # printed text is just text the parent keeps


def test_output_flood_is_cut_and_bounded():
    code = "def drift(ratio, advantage, clip_eps):\n    while True:\n        print('x' * 99)\n"
    with DriftSandbox(code, SandboxLimits(output_bytes=200_000, call_timeout_s=30)) as box:
        with pytest.raises(ProposalError) as info:
            box.drift(np.ones(2), np.ones(2), 0.2)
        assert 0 < len(box.output) <= 8192
        with pytest.raises(ProposalError, match="no longer running") as again:
            box.drift(np.ones(2), np.ones(2), 0.2)
    assert info.value.reason == again.value.reason == "output"
    assert "output_bytes=200000" in info.value.message
    assert len(info.value.output) <= 8192 and len(info.value.message) <= 2000


def test_forged_replies_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    payload = pickle.dumps(Evil())
    code = src(f"""
        import os

        def drift(ratio, advantage, clip_eps):
            os.write(4, {payload!r} + b"\\n")
            return ratio
    """)
    e = call_error(code)
    assert e.reason == "protocol" and not marker.exists()
    short = src("""
        import os

        def drift(ratio, advantage, clip_eps):
            os.write(4, b'{"ok": true, "n": 3}\\n' + bytes(24))
            return ratio
    """)
    e = call_error(short)
    assert e.reason == "protocol" and "3 values for a request of 4" in e.message


def test_parent_is_fine_after_all_of_this():
    with DriftSandbox(PPO_CLIP_SOURCE) as box:
        drift, grad = box.drift(np.array([0.5, 1.0, 1.5]), np.array([-1.0, 1.0, 1.0]), 0.2)
        validate_drift(box.drift)
    np.testing.assert_allclose(drift, [0.3, 0.0, 0.3], atol=1e-6)
    np.testing.assert_allclose(grad, [-1.0, 0.0, 1.0], atol=1e-6)
    assert not box.running
    with pytest.raises(RuntimeError, match="closed"):
        box.drift(np.ones(1), np.ones(1), 0.2)


# -- the generic sandbox: named inputs, constants, several outputs, chosen gradients -------


def test_generic_call_with_named_inputs_constants_and_gradients():
    code = src("""
        def f(x, k, y, scale):
            assert isinstance(k, int) and isinstance(scale, float)
            return x * y * scale + k, x ** 2 * k
    """)
    gen = np.random.default_rng(0)
    x = gen.normal(size=(2, 3)).astype(np.float32)
    y = gen.normal(size=(2, 3)).astype(np.float32)
    with Sandbox(code, "f", ("x", "k", "y", "scale")) as box:
        # inputs and constants by name, in any order; the function gets them positionally
        res = box.call({"y": y, "x": torch.from_numpy(x)}, {"scale": 0.5, "k": 3},
                       grad=("y", "x"), outputs=2)
        assert [o.shape for o in res.outputs] == [(2, 3), (2, 3)]
        np.testing.assert_allclose(res.outputs[0], x * y * 0.5 + 3, rtol=1e-6)
        np.testing.assert_allclose(res.outputs[1], x ** 2 * 3, rtol=1e-6)
        # d sum(outputs) / d input, for the inputs asked
        np.testing.assert_allclose(res.grads["x"], y * 0.5 + 6 * x, rtol=1e-5)
        np.testing.assert_allclose(res.grads["y"], x * 0.5, rtol=1e-6)
        assert box.call({"x": x, "y": y}, {"k": 1, "scale": 1.0}, outputs=2).grads == {}
        with pytest.raises(ValueError, match="2 outputs"):
            _ = res.output
        # one output asked, a tuple returned: a shape error the child survives
        with pytest.raises(ProposalError) as info:
            box.call({"x": x, "y": y}, {"k": 1, "scale": 1.0})
        assert info.value.reason == "shape" and box.running
        # the parent checks the call against the signature before sending anything
        with pytest.raises(ValueError, match="each parameter once"):
            box.call({"x": x}, {"k": 1, "scale": 1.0})
        with pytest.raises(ValueError, match="grad"):
            box.call({"x": x, "y": y}, {"k": 1, "scale": 1.0}, grad=("k",), outputs=2)
        with pytest.raises(ValueError, match="one shape"):
            box.call({"x": x, "y": y[0]}, {"k": 1, "scale": 1.0}, outputs=2)
        with pytest.raises(ValueError, match="finite"):
            box.call({"x": x, "y": y}, {"k": 1, "scale": float("nan")}, outputs=2)
        assert box.running and box.function == "f"


def test_generic_signature_is_the_one_asked_for():
    e = load_error("def g(a, b):\n    return a\n")  # the drift signature: three parameters
    assert e.reason == "signature" and "exactly three parameters" in e.message
    box = Sandbox("def g(a, b, c):\n    return a\n", "g", ("a", "b"))
    with pytest.raises(ProposalError) as info:
        box.start()
    assert info.value.reason == "signature"
    assert "exactly two parameters (a, b); found g(a, b, c)" in info.value.message
    with pytest.raises(ValueError, match="params"):
        Sandbox("def g(a):\n    return a\n", "g", ("a", "a"))
    with pytest.raises(TypeError, match="DriftSandbox"):
        with Sandbox("def g(a):\n    return a\n", "g", ("a",)) as other:
            SandboxedDrift(other)


# -- large calls: the shared region and the pipes ------------------------------------------

LARGE = src("""
    def f(a, b, scale, c, d, e):
        return a * b + c / (d * d + 1.0) - scale * e, torch.sqrt(torch.abs(a)) * e + d
""")


@pytest.fixture(params=["shared region", "pipes: too large for the region",
                        "pipes: no region"])
def transport(request, monkeypatch):
    """Each way the values of a call can travel (the region is made at start)."""
    if request.param == "pipes: too large for the region":
        monkeypatch.setattr(core, "_SHARED_BYTES", 1 << 20)
    elif request.param == "pipes: no region":
        monkeypatch.setattr(core, "_SHARED_BYTES", 0)
    return request.param


def count_sent(box: Sandbox) -> list[int]:
    """Record the bytes of each message the parent writes to the request pipe."""
    sent, send = [], box._send

    def counting(parts, deadline, phase):
        sent.append(sum(memoryview(p).nbytes for p in parts))
        return send(parts, deadline, phase)

    box._send = counting
    return sent


def test_large_call_returns_exactly_the_in_process_numbers(transport):
    shape, n = (500, 400), 200_000
    gen = np.random.default_rng(1)

    def in_process(x: dict, scale: float):
        """The same function here: outputs and d sum(outputs) / d b, d."""
        t = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in x.items()}
        o1 = t["a"] * t["b"] + t["c"] / (t["d"] * t["d"] + 1.0) - scale * t["e"]
        o2 = torch.sqrt(torch.abs(t["a"])) * t["e"] + t["d"]
        gb, gd = torch.autograd.grad(o1.sum() + o2.sum(), [t["b"], t["d"]])
        return [v.detach().numpy() for v in (o1, o2, gb, gd)]

    with Sandbox(LARGE, "f", ("a", "b", "scale", "c", "d", "e")) as box:
        sent = count_sent(box)
        for scale in (0.37, -2.5):  # twice: nothing stale from the first call
            x = {k: gen.normal(size=shape).astype(np.float32) for k in "abcde"}
            before = {k: v.copy() for k, v in x.items()}
            inputs = {k: x[k] for k in "ecadb"}  # in any order, tensors or arrays
            inputs.update(a=torch.from_numpy(x["a"]), c=x["c"].astype(np.float64))
            res = box.call(inputs, {"scale": scale}, grad=("d", "b"), outputs=2)
            o1, o2, gb, gd = in_process(x, scale)
            for got, want in zip(res.outputs + (res.grads["b"], res.grads["d"]),
                                 (o1, o2, gb, gd)):
                assert got.shape == shape and got.dtype == np.float32
                np.testing.assert_array_equal(got, want)
            assert sorted(res.grads) == ["b", "d"]
            for k in x:
                np.testing.assert_array_equal(x[k], before[k])  # the caller's arrays
        if transport == "shared region":
            assert box._shm is not None and max(sent[-2:]) < 4096  # only the JSON lines
        else:
            assert (box._shm is None) == (transport == "pipes: no region")
            assert min(sent[-2:]) > 5 * 4 * n  # the JSON line and five inputs' values
        with open("/proc/sys/fs/pipe-max-size") as f:
            allowed = ROOT or int(f.read()) >= core._PIPE_BYTES
        if allowed:  # the pipes were enlarged
            for fd in (box._req, box._rep):
                assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) == core._PIPE_BYTES


LARGE_FAILURES = {
    # a reply line whose size is not the request's
    "size mismatch": ("""
        import os

        def f(a, b):
            os.write(4, b'{"ok": true, "n": 5}\\n')
            return a
    """, "protocol", "the child announced 5 values for a request of 200000"),
    # the child ends as the request arrives: over the pipes, while the parent is still
    # writing the values (the pipe holds 1 MiB of 1.6 MB). A shared call's request is one
    # short line, which the worker may read before the thread looks: the function ends it.
    "death during the request": ("""
        import os
        import select
        import threading
        import time

        threading.Thread(target=lambda: select.select([3], [], []) and os._exit(3),
                         daemon=True).start()

        def f(a, b):
            time.sleep(0.5)
            os._exit(3)
    """, "died", "exited during a call with status 3"),
    # a well-formed reply line, then part of the values (none for a shared call, whose
    # values are not on the pipe), then the end
    "death during the reply": ("""
        import os

        def f(a, b):
            os.write(4, b'{"ok": true, "n": 200000}\\n' + bytes(JUNK))
            os._exit(3)
    """, "died", "exited during a call with status 3"),
}


@pytest.mark.parametrize("case", list(LARGE_FAILURES))
def test_large_call_failures_are_the_right_proposal_error(transport, case):
    code, reason, words = LARGE_FAILURES[case]
    code = code.replace("JUNK", "0" if transport == "shared region" else "100_000")
    x = np.ones(200_000, np.float32)
    with Sandbox(src(code), "f", ("a", "b")) as box:
        if case == "death during the reply" and transport == "shared region":
            # The line is a whole reply to a shared call: it returns what the region holds;
            # the death shows at the next call.
            res = box.call({"a": x, "b": x})
            assert res.output.shape == x.shape and res.output.dtype == np.float32
        with pytest.raises(ProposalError) as info:
            box.call({"a": x, "b": x})
        assert not box.running
    assert info.value.reason == reason and words in info.value.message, info.value


def test_scribbling_on_the_shared_region_changes_only_its_own_outputs():
    code = src("""
        import os
        import threading

        calls = []

        def f(a, b):
            calls.append(len(calls))
            size = os.fstat(5).st_size
            tried = []
            for new in (0, size // 2, 2 * size):  # shrinking would make the parent fault
                try:
                    os.ftruncate(5, new)
                    tried.append(f"resized to {new}")
                except OSError as e:
                    tried.append(e.strerror)
            if len(calls) == 1:
                raise RuntimeError(f"{size} bytes: {tried}")
            threading.Thread(target=lambda: [os.pwrite(5, bytes([i % 251]) * (1 << 20), at)
                                             for i in range(10 ** 9)
                                             for at in range(0, size, 1 << 20)],
                             daemon=True).start()
            return a * b
    """)
    n = 200_000
    a = np.arange(n, dtype=np.float32)
    with Sandbox(code, "f", ("a", "b")) as box:
        with pytest.raises(ProposalError) as info:
            box.call({"a": a, "b": a})
        # the region can be neither shrunk nor grown (sealed; growing also meets
        # RLIMIT_FSIZE), so the parent's mapping never faults
        assert info.value.reason == "runtime" and box.running
        assert (f"{core._SHARED_BYTES} bytes: ['Operation not permitted', "
                f"'Operation not permitted', ") in info.value.message
        assert "resized" not in info.value.message
        assert box._shm.size() == core._SHARED_BYTES
        results = [box.call({"a": a, "b": np.full(n, 2.0)}).output for _ in range(3)]
        kept = [r.copy() for r in results]
        time.sleep(0.1)  # the thread keeps writing over inputs and outputs alike
        for r, k in zip(results, kept):  # what a call returned is the parent's own copy
            assert r.shape == (n,) and r.dtype == np.float32
            np.testing.assert_array_equal(r, k)
        np.testing.assert_array_equal(a, np.arange(n, dtype=np.float32))
        assert box.running
