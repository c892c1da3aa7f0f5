"""Thread settings: --threads / --inter-op-threads parsed on generate, search, eval, index and serve, reaching
ONNX Runtime's session options; bad values refused in one line; the default core count respects affinity, SMT
siblings and a cgroup CPU quota."""

from __future__ import annotations

import os

import pytest

from retrv.app import cli
from retrv.app.commands import _backend_kwargs
from retrv.runtime.backends import open_backend
from retrv.runtime.backends.ort import OrtBackend, cgroup_cpu_limit, physical_cores
from retrv.runtime.errors import InputError
from retrv.runtime.pack import Pack


def _options(backend):
    return backend.runner("decoder").session.get_session_options()


def test_threads_reach_the_session_options(tiny_pack):
    import onnxruntime as ort

    pack = Pack.open(tiny_pack)
    opts = _options(open_backend(pack, "ort", threads=1, inter_op_threads=2, cache_dir=None))
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 2
    assert opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    opts = _options(open_backend(pack, "ort", cache_dir=None))  # defaults: the cores, one inter-op, sequential
    assert opts.intra_op_num_threads == physical_cores() and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_the_decoder_session_schedules_in_dynamic_blocks_and_a_caller_may_override(tiny_pack):
    pack = Pack.open(tiny_pack)
    backend = open_backend(pack, "ort", threads=2, cache_dir=None)
    assert _options(backend).get_session_config_entry("session.dynamic_block_base") == "4"
    with pytest.raises(Exception, match="does not have configuration"):  # the decoder's setting only
        backend.runner("vision").session.get_session_options().get_session_config_entry("session.dynamic_block_base")
    backend = OrtBackend(pack, threads=2, cache_dir=None, session_config={"session.dynamic_block_base": "0"})
    assert _options(backend).get_session_config_entry("session.dynamic_block_base") == "0"


@pytest.mark.parametrize("kw,msg", [(dict(threads=0), r"--threads: got 0; expected an integer from 1 to 1024"),
                                    (dict(threads=True), "--threads: got True"),
                                    (dict(inter_op_threads=None), "--inter-op-threads: got None"),
                                    (dict(inter_op_threads=2000), "--inter-op-threads: got 2000")])
def test_bad_thread_counts_are_refused(tiny_pack, kw, msg):
    with pytest.raises(InputError, match=msg):
        open_backend(Pack.open(tiny_pack), "ort", cache_dir=None, **kw)


@pytest.mark.parametrize("argv", [
    ["search", "IDX", "--pack", "P", "--text", "x"],
    ["eval", "IDX", "--queries", "q.jsonl", "--pack", "P"],
    ["index", "build", "P", "c.jsonl", "IDX"],
])
def test_query_commands_parse_the_flags_into_backend_kwargs(argv):
    args = cli.build_parser().parse_args(argv + ["--threads", "2", "--inter-op-threads", "3"])
    kw = _backend_kwargs(args)
    assert kw["threads"] == 2 and kw["inter_op_threads"] == 3
    defaults = _backend_kwargs(cli.build_parser().parse_args(argv))
    assert defaults["threads"] is None and defaults["inter_op_threads"] == 1


def test_generate_passes_them_to_the_session(tiny_pack, monkeypatch, capsys):
    import retrv.runtime.generate as generate

    original, seen = generate.load_pack_generator, {}

    def spy(pack_dir, backend="auto", **kw):
        gen = original(pack_dir, backend, cache_dir=None, **kw)
        opts = gen.backend.runner("decoder").session.get_session_options()
        seen.update(intra=opts.intra_op_num_threads, inter=opts.inter_op_num_threads)
        return gen

    monkeypatch.setattr(generate, "load_pack_generator", spy)
    assert cli.main(["generate", str(tiny_pack), "--prompt", "hi", "--max-new-tokens", "1", "--threads", "1",
                     "--inter-op-threads", "2"]) == 0
    assert seen == {"intra": 1, "inter": 2}


def test_serve_passes_them_on(tiny_pack, monkeypatch, capsys):
    import retrv.app.serve as serve

    seen = {}
    monkeypatch.setattr(serve, "serve", lambda pack, index, **kw: seen.update(kw))
    assert cli.main(["serve", "--pack", str(tiny_pack), "--threads", "2", "--inter-op-threads", "1"]) == 0
    assert seen["threads"] == 2 and seen["inter_op_threads"] == 1


@pytest.mark.parametrize("argv", [["generate", "P", "--prompt", "x", "--threads", "0"],
                                  ["search", "I", "--pack", "P", "--inter-op-threads", "-1"],
                                  ["serve", "--pack", "P", "--threads", "many"]])
def test_bad_flag_values_are_one_line_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "expected an integer in [1, 1024]" in err


def test_cgroup_quota_and_smt_siblings_bound_the_default(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cpu_limit(cpu_max) == 2
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(cpu_max) is None
    assert cgroup_cpu_limit(tmp_path / "missing") is None
    allowed = sorted(os.sched_getaffinity(0))
    root = tmp_path / "cpu"
    for cpu in allowed:  # every allowed CPU a hyper-thread of one core
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text("0\n")
    assert physical_cores(root, tmp_path / "missing") == 1
    for cpu in allowed:  # distinct cores, capped by a one-CPU quota
        (root / f"cpu{cpu}" / "topology" / "core_id").write_text(f"{cpu}\n")
    assert physical_cores(root, tmp_path / "missing") == len(allowed)
    cpu_max.write_text("100000 100000\n")
    assert physical_cores(root, cpu_max) == 1
