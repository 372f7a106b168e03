"""Model, run and sweep directories are data (issue 16): nothing named in them runs untrusted, saves are
atomic per directory, files are checksummed, damaged records are one clear error, and every mistake is
one line with the right exit code."""
import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import leanconv
from leanconv.cli import main
from leanconv.demo.teacher import fmnist_resnet
from leanconv.errors import ConfigError, ModelError, NumericalError, OutputError
from leanconv.models import ModelSource
from leanconv.pipeline import RunConfig
from leanconv.serialize import LOCK, MANIFEST, WEIGHTS, locked, weights_file

TEACHER = "leanconv.demo.teacher:fmnist_resnet"
X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def tiny_net(width: int = 8) -> nn.Module:
    """A factory of the user's own (model spec ``test_security:tiny_net``)."""
    torch.manual_seed(0)
    return fmnist_resnet(width=width)


def _convert(recipe: str = "sic-m2", spec: str = TEACHER, width: int = 8):
    torch.manual_seed(0)
    source = ModelSource(spec, {"width": width})
    return leanconv.convert(source.build().eval(), recipe, X[:1], source=source)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A converted model saved in a directory, and what it computes."""
    d = tmp_path_factory.mktemp("model") / "m"
    model, plan = _convert()
    leanconv.save(model, plan, d)
    return d, model.eval()(X).detach(), plan


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_manifest(d: Path, edit) -> None:
    info = json.loads((d / MANIFEST).read_text())
    edit(info)
    (d / MANIFEST).write_text(json.dumps(info))


def _one_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [l for l in err.splitlines() if l.strip() and "it/s" not in l and "?it" not in l]  # no progress bars
    assert len(lines) == 1 and "Traceback" not in err, err
    for e in expected:
        assert e in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- 1. directories are data


def _evil(sentinel: Path) -> dict:
    return {"spec": "subprocess:run", "kwargs": {"args": ["touch", str(sentinel)]}}


def test_a_factory_named_in_a_manifest_is_not_run(tmp_path, saved, capsys):
    d, _, _ = saved
    evil, sentinel = _copy(d, tmp_path / "evil"), tmp_path / "pwned"
    _edit_manifest(evil, lambda m: m.update(source=_evil(sentinel)))
    with pytest.raises(ModelError, match=r"'subprocess:run'.*--trust-source"):
        leanconv.load(evil)
    with pytest.raises(ModelError, match="subprocess:run"):
        leanconv.load(evil, trust_source="mypkg:net")  # trust in another factory is not trust in this one
    assert main(["report", str(evil)]) == 2
    _one_line(capsys, "subprocess:run", "--trust-source")
    assert main(["export", "--from", str(evil), "--onnx", str(tmp_path / "m.onnx")]) == 2
    _one_line(capsys, "subprocess:run")
    assert not sentinel.exists()


def test_a_trusted_factory_is_run_and_a_builtin_needs_no_trust(tmp_path, saved):
    d, out, _ = saved
    assert torch.equal(leanconv.load(d)(X), out)  # leanconv's own builder: no trust needed
    own = tmp_path / "own"
    model, plan = _convert(spec="test_security:tiny_net")
    leanconv.save(model, plan, own)
    with pytest.raises(ModelError, match="test_security:tiny_net"):
        leanconv.load(own)
    for trust in (True, "test_security:tiny_net"):
        assert torch.equal(leanconv.load(own, trust_source=trust)(X), model.eval()(X))
    assert torch.equal(leanconv.load(own, base=tiny_net())(X), model.eval()(X))  # or build the base yourself


def test_a_factory_named_in_sweep_or_run_records_is_not_run(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    run = {"source": _evil(sentinel), "recipe": leanconv.get_recipe("sic-m2").to_dict(), "data": "fashion-mnist",
           "dir": "sic-m2", "input_size": 16, "in_chans": 1, "select": None, "target_macs": None,
           "train_images": 8, "eval_images": 8, "report_batches": [1], "latency_budget_s": 0.1, "calibrate": False,
           "seed": 0}
    (sweep / "sweep.json").write_text(json.dumps({"format": "leanconv-sweep/1", "status": "running",
                                                  "recipes": ["sic-m2"], "runs": [run]}))
    assert main(["sweep", "--resume", str(sweep)]) == 2
    _one_line(capsys, "subprocess:run", "--trust-source")
    rundir = tmp_path / "run"
    rundir.mkdir()
    (rundir / "run.json").write_text(json.dumps({"format": "leanconv-run/1", "status": "finished", "stages": {},
                                                 "config": {"source": _evil(sentinel), "data": "fashion-mnist",
                                                            "input_size": 16, "in_chans": 1}}))
    assert main(["report", str(rundir)]) == 2
    _one_line(capsys, "subprocess:run")
    assert not sentinel.exists()


@pytest.mark.parametrize("source, message", [
    ({"spec": "torchvision:resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}}, "fetches or reads files"),
    ({"spec": "timm:resnet18", "kwargs": {"checkpoint_path": "/etc/passwd"}}, "reads files"),
    ({"spec": "torchvision:resnet18", "kwargs": {"norm_layer": {"a": 1}}}, "not a plain"),
    ({"spec": "torchvision:resnet18", "kwargs": {"num_classes": 10 ** 12}}, "not a plain"),
    ({"spec": "torchvision:no_such_net"}, "torchvision does not have"),
    ({"spec": "torchvision:resnet18", "kwargs": ["x"]}, "kwargs must be an object"),
    ({"spec": 5}, "string 'spec'"),
    ({"spec": ".foo:bar"}, "must look like"),
    ({"spec": "leanconv.cli:main", "kwargs": {"argv": ["recipes"]}}, "--trust-source"),  # leanconv's, not a builder
    ({"spec": "leanconv.__main__:main"}, "--trust-source"),  # never imported: importing it would run the CLI
    ({"spec": "leanconv.demo.teacher:train_classifier"}, "--trust-source"),
])
def test_a_builtin_source_from_a_file_is_checked_before_it_is_built(tmp_path, saved, source, message):
    if source["spec"] == "timm:resnet18":
        pytest.importorskip("timm")
    d = _copy(saved[0], tmp_path / "m")
    _edit_manifest(d, lambda m: m.update(source=source))
    with pytest.raises(ModelError, match=message):
        leanconv.load(d)


# --------------------------------------------------------------------------- 2. saving is atomic per directory


def _two_models():
    a, plan_a = _convert("sic-m2")
    b, plan_b = _convert("unravel-b4")
    return (a, plan_a, a.eval()(X).detach()), (b, plan_b, b.eval()(X).detach())


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupted_save_leaves_the_old_model_or_the_new_one(tmp_path, monkeypatch, when):
    """Interrupt the save just before, or just after, each rename or link in turn: the directory always
    loads, as A or as B, with the matching plan, and no file of the other is left once a save completes."""
    (a, plan_a, out_a), (b, plan_b, out_b) = _two_models()
    real_replace, real_link = os.replace, os.link
    seen = {"a": 0, "b": 0}
    for k in range(1, 20):
        d = tmp_path / f"m{k}"
        leanconv.save(a, plan_a, d)
        calls = [0]

        def counted(real):
            def op(*args, **kw):
                calls[0] += 1
                if calls[0] == k and when == "before":
                    raise KeyboardInterrupt
                result = real(*args, **kw)
                if calls[0] == k:
                    raise KeyboardInterrupt
                return result
            return op

        monkeypatch.setattr(os, "replace", counted(real_replace))
        monkeypatch.setattr(os, "link", counted(real_link))
        try:
            leanconv.save(b, plan_b, d)
            done = True
        except KeyboardInterrupt:
            done = False
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(os, "link", real_link)
        got = leanconv.load(d)(X)
        which = "a" if torch.equal(got, out_a) else "b"
        assert torch.equal(got, out_b if which == "b" else out_a), k
        assert leanconv.load_plan(d).recipe == (plan_b if which == "b" else plan_a).recipe, k
        seen[which] += 1
        if done:
            assert which == "b" and sorted(p.name for p in d.iterdir()) == [LOCK, MANIFEST, WEIGHTS, "plan.json"]
            assert json.loads((d / "plan.json").read_text())["recipe"] == plan_b.recipe
            break
    assert seen["a"] and seen["b"], seen  # the interruptions hit both sides of the commit


def test_a_full_disk_while_saving_keeps_the_old_model(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    (a, plan_a, out_a), (b, plan_b, _) = _two_models()
    d = tmp_path / "m"
    leanconv.save(a, plan_a, d)
    real = safetensors.torch.save_model

    def half_then_full(model, path, *args, **kw):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", half_then_full)
    with pytest.raises(OutputError, match="No space left on device; free some space"):
        leanconv.save(b, plan_b, d)
    assert torch.equal(leanconv.load(d)(X), out_a) and leanconv.load_plan(d).recipe == plan_a.recipe
    monkeypatch.setattr(safetensors.torch, "save_model", real)

    import leanconv.serialize as ser  # the weights are written, the manifest is not
    real_json = ser.write_json

    def full_manifest(path, data, durable=False):
        if Path(path).name == MANIFEST:
            raise ser.output_error(path, OSError(errno.ENOSPC, "No space left on device"))
        real_json(path, data, durable)

    monkeypatch.setattr(ser, "write_json", full_manifest)
    with pytest.raises(OutputError, match="No space left"):
        leanconv.save(b, plan_b, d)
    assert torch.equal(leanconv.load(d)(X), out_a)
    assert sorted(p.name for p in d.iterdir()) == [LOCK, MANIFEST, WEIGHTS, "plan.json"]  # nothing left behind

    monkeypatch.setattr(safetensors.torch, "save_model", half_then_full)  # the CLI: one line, rc 2
    monkeypatch.setattr(ser, "write_json", real_json)
    assert main(["convert", "--model", TEACHER, "--model-arg", "width=8", "--in-chans", "1", "--input-size", "16",
                 "--out", str(d), "--overwrite"]) == 2
    _one_line(capsys, "No space left on device")
    assert torch.equal(leanconv.load(d)(X), out_a)


def test_saving_into_a_run_directory_keeps_the_run(tmp_path, saved):
    d = tmp_path / "run"
    for f in ("run.json", "calibrated/manifest.json", "finetune/checkpoint.pt", "report.json"):
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_text(f)
    model, plan = _convert()
    leanconv.save(model, plan, d)
    for f in ("run.json", "calibrated/manifest.json", "finetune/checkpoint.pt", "report.json"):
        assert (d / f).read_text() == f


def test_a_model_saved_by_leanconv_0_1_still_loads(tmp_path, saved):
    d, out, plan = saved
    old = _copy(d, tmp_path / "old")
    _edit_manifest(old, lambda m: (m.update(format="leanconv-model/1"), m.pop("weights"), m.pop("plan")))
    assert torch.equal(leanconv.load(old)(X), out)
    assert leanconv.load_plan(old).to_dict() == plan.to_dict()


def test_a_model_safetensors_of_someone_else_is_not_replaced(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / WEIGHTS).write_bytes(b"my own file")
    model, plan = _convert()
    leanconv.save(model, plan, d)
    assert (d / WEIGHTS).read_bytes() == b"my own file"
    assert weights_file(d).name.startswith("model-") and torch.equal(leanconv.load(d)(X), model.eval()(X))


# --------------------------------------------------------------------------- 3. --out refusals and locks


CONVERT = ["convert", "--model", TEACHER, "--model-arg", "width=8", "--in-chans", "1", "--input-size", "16"]


def test_convert_refuses_a_model_without_overwrite_and_a_run_always(tmp_path, capsys):
    out = tmp_path / "m"
    assert main([*CONVERT, "--out", str(out)]) == 0
    (out / "report.json").write_text("{}")  # a report of the model about to be replaced
    capsys.readouterr()
    assert main([*CONVERT, "--recipe", "unravel-b4", "--out", str(out)]) == 2
    _one_line(capsys, "already holds a converted model", "--overwrite")
    assert leanconv.load_plan(out).recipe == "sic-m2"
    assert main([*CONVERT, "--recipe", "unravel-b4", "--out", str(out), "--overwrite"]) == 0
    assert leanconv.load_plan(out).recipe == "unravel-b4" and not (out / "report.json").exists()
    (out / "run.json").write_text("{}")
    capsys.readouterr()
    assert main([*CONVERT, "--out", str(out), "--overwrite"]) == 2
    _one_line(capsys, "holds a leanconv run")


def test_a_locked_directory_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another job holds it
    monkeypatch.setattr(leanconv, "convert", lambda *a, **k: pytest.fail("converted a locked directory"))
    try:
        assert main([*CONVERT, "--out", str(out)]) == 2
        _one_line(capsys, "being written by another leanconv job (pid 4242)")
        with pytest.raises(OutputError, match="another leanconv job"):
            with locked(out):
                pass
    finally:
        os.close(fd)
    with locked(out), locked(out):  # free again, and re-entrant within a process
        pass


def test_two_jobs_on_one_directory_one_is_refused(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from leanconv.serialize import locked
        with locked({str(tmp_path / 'd')!r}):
            print("locked", flush=True)
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            with locked(tmp_path / "d"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked(tmp_path / "d"):  # the OS released it with the process
        pass


# --------------------------------------------------------------------------- 4. weights are verified


@pytest.mark.parametrize("damage", ["flip", "swap", "dtype"])
def test_altered_weight_files_are_refused(tmp_path, saved, damage):
    d = _copy(saved[0], tmp_path / "m")
    w = weights_file(d)
    raw = bytearray(w.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if damage == "flip":
        raw[-5] ^= 0x10
    else:
        names = [k for k in header if k != "__metadata__"]
        if damage == "swap":  # two tensors of one size trade places
            by_size = {}
            for k in names:
                start, end = header[k]["data_offsets"]
                by_size.setdefault(end - start, []).append(k)
            k1, k2 = next(v for v in by_size.values() if len(v) > 1)[:2]
            header[k1]["data_offsets"], header[k2]["data_offsets"] = header[k2]["data_offsets"], header[k1]["data_offsets"]
        else:
            k = next(k for k in names if header[k]["dtype"] == "F32")
            header[k]["dtype"] = "I32"
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        raw[8:8 + n] = text
    w.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="does not match the SHA-256 its manifest records"):
        leanconv.load(d)


def test_an_integer_checkpoint_is_refused_and_a_float16_one_accepted(tmp_path, capsys):
    sd = tiny_net().state_dict()
    save_file({k: v.to(torch.int64).contiguous() for k, v in sd.items()}, str(tmp_path / "int.safetensors"))
    assert main([*CONVERT, "--checkpoint", str(tmp_path / "int.safetensors"), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "another kind of dtype", "int64 vs model float32")
    assert not (tmp_path / "o").exists()
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
              str(tmp_path / "half.safetensors"))
    m = ModelSource(TEACHER, {"width": 8}, checkpoint=str(tmp_path / "half.safetensors")).build()
    assert m.fc.weight.dtype == torch.float32 and torch.equal(m.fc.weight, sd["fc.weight"].half().float())


# --------------------------------------------------------------------------- 5. damaged records


def _layer0(m: dict) -> dict:
    return m["layers"][next(iter(m["layers"]))]


def _sic_layer(m: dict) -> dict:
    return _layer0(m)["layers"][0]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("layers"), "field 'layers' is missing"),
    (lambda m: m.update(layers=[1, 2]), "field 'layers' should be dict"),
    (lambda m: m.update(weights={**m["weights"], "file": "../../etc/passwd"}), "not a name leanconv writes"),
    (lambda m: m.update(weights={**m["weights"], "sha256": "abc"}), "64 hex digits"),
    (lambda m: m.update(weights={**m["weights"], "bytes": "many"}), "should be int"),
    (lambda m: m.update(format="leanconv-model/9"), "expected"),
    (lambda m: _sic_layer(m).update(in_channels=1_000_000_000), "more than 65536"),
    (lambda m: _sic_layer(m).update(kernel_size=[300, 300]), "wider than 65536"),
    (lambda m: _sic_layer(m).update(out_channels=4000), "does not fit the model"),
    (lambda m: _sic_layer(m).update(in_channels="x"), "cannot be built"),
    (lambda m: _sic_layer(m).pop("stride"), "cannot be built"),
    (lambda m: _layer0(m).update(type="Evil"), "cannot be built"),
    (lambda m: m["layers"].update({"no.such.layer": _layer0(m)}), "does not have"),
    (lambda m: m["source"]["kwargs"].update(num_classes=1_000_000_000), "does not fit the model"),
    (lambda m: m["source"]["kwargs"].update(width=60000), "does not fit the model"),
    (lambda m: m.update(plan={"recipe": "x"}), None),  # load works; load_plan says the plan is damaged
])
def test_a_damaged_manifest_is_one_clear_error(tmp_path, saved, edit, message, capsys):
    d = _copy(saved[0], tmp_path / "m")
    _edit_manifest(d, edit)
    if message is None:
        leanconv.load(d)
        with pytest.raises(ModelError, match="its plan is incomplete"):
            leanconv.load_plan(d)
        return
    with pytest.raises(ModelError, match=message):
        leanconv.load(d)
    assert main(["export", "--from", str(d), "--onnx", str(tmp_path / "x.onnx")]) == 2
    _one_line(capsys)


@pytest.mark.parametrize("multiplier, message", [(1_000_000_000, "more than 65536"), (1000, "does not fit"),
                                                 (1.5, "cannot be built"), ("4", "cannot be built")])
def test_an_unravel_multiplier_edited_in_a_manifest_is_refused(tmp_path, multiplier, message):
    model, plan = _convert("unravel-b4")
    leanconv.save(model, plan, tmp_path / "m")
    _edit_manifest(tmp_path / "m", lambda m: _layer0(m).update(multiplier=multiplier))
    with pytest.raises(ModelError, match=message):
        leanconv.load(tmp_path / "m")


def test_absurd_sizes_are_refused_without_allocating(tmp_path, saved):
    """With 4 GB of address space to spare: a manifest asking for a 4-billion-channel layer (16 GB of depthwise
    weights) or a billion-class head is refused from the weight file's header, before any of it is allocated."""
    d = _copy(saved[0], tmp_path / "wide")
    _edit_manifest(d, lambda m: _sic_layer(m).update(in_channels=65536, out_channels=65536))
    d2 = _copy(saved[0], tmp_path / "classes")
    _edit_manifest(d2, lambda m: m["source"]["kwargs"].update(num_classes=1_000_000_000))
    script = textwrap.dedent(f"""
        import resource
        import leanconv
        size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) << 10
        resource.setrlimit(resource.RLIMIT_AS, (size + (4 << 30), size + (4 << 30)))
        for d in ({str(d)!r}, {str(d2)!r}):
            try:
                leanconv.load(d)
            except leanconv.ModelError as e:
                assert "does not fit the model" in str(e), e
            else:
                raise SystemExit("loaded")
        print("refused")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0 and r.stdout.strip() == "refused", r.stderr[-2000:]


@pytest.mark.parametrize("record, message", [
    ({"format": "leanconv-run/1", "config": {}, "stages": {}}, "field 'status' is missing"),
    ({"format": "leanconv-run/1", "status": "finished", "config": [], "stages": {}}, "field 'config' should be dict"),
    ({"format": "leanconv-run/1", "status": "finished", "stages": {},
      "config": {"source": {"spec": TEACHER, "kwargs": {"width": 8}}, "data": "fashion-mnist", "input_size": 10 ** 9,
                 "in_chans": 1}}, "out of range"),
    ({"format": "leanconv-run/1", "status": "finished", "stages": {},
      "config": {"source": {"spec": 3}, "data": "fashion-mnist", "input_size": 16, "in_chans": 1}}, "string 'spec'"),
    ([1, 2], "has format None"),
])
def test_a_damaged_run_json_is_one_clear_error(tmp_path, record, message, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.json").write_text(json.dumps(record))
    assert main(["report", str(d)]) == 2
    _one_line(capsys, message)


def test_a_user_factory_in_a_sweep_runs_only_when_trusted(tmp_path):
    from leanconv.sweep import sweep_runs

    run = {"source": {"spec": "test_security:tiny_net", "kwargs": {"width": 8}},
           "recipe": leanconv.get_recipe("sic-m2").to_dict(), "data": "fashion-mnist", "dir": "sic-m2",
           "input_size": 16, "in_chans": 1, "select": None, "target_macs": None, "train_images": 8, "eval_images": 8,
           "report_batches": [1], "latency_budget_s": 0.1, "calibrate": False, "seed": 0}
    (tmp_path / "sweep.json").write_text(json.dumps({"format": "leanconv-sweep/1", "status": "running",
                                                     "recipes": ["sic-m2"], "runs": [run]}))
    with pytest.raises(ModelError, match="test_security:tiny_net"):
        sweep_runs(tmp_path)
    for trust in (True, "test_security:tiny_net"):
        (cfg,) = sweep_runs(tmp_path, trust_source=trust)
        assert cfg.source.spec == "test_security:tiny_net" and cfg.out == tmp_path / "sic-m2"


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("data"), "incomplete"),
    (lambda r: r.update(dir="../elsewhere"), "not a name inside the sweep"),
    (lambda r: r.update(recipe=5), "damaged"),
    (lambda r: r.update(train_images=0), "train_images must be"),
    (lambda r: r.update(source={"spec": "torchvision:resnet18", "kwargs": {"pretrained_cfg": {"url": "x"}}}),
     "fetches or reads files"),
])
def test_a_damaged_sweep_json_is_one_clear_error(tmp_path, edit, message, capsys):
    run = {"source": {"spec": TEACHER, "kwargs": {"width": 8}}, "recipe": leanconv.get_recipe("sic-m2").to_dict(),
           "data": "fashion-mnist", "dir": "sic-m2", "input_size": 16, "in_chans": 1, "select": None,
           "target_macs": None, "train_images": 8, "eval_images": 8, "report_batches": [1],
           "latency_budget_s": 0.1, "calibrate": False, "seed": 0}
    edit(run)
    (tmp_path / "sweep.json").write_text(json.dumps({"format": "leanconv-sweep/1", "status": "running",
                                                     "recipes": ["sic-m2"], "runs": [run]}))
    assert main(["sweep", "--resume", str(tmp_path)]) == 2
    _one_line(capsys, message)


# --------------------------------------------------------------------------- 6. non-finite weights


@pytest.mark.parametrize("recipe", ["sic-m2", "sic-topo2d", "unravel-b4", "topo3d", "sic-bottleneck"])
def test_non_finite_weights_are_refused_before_conversion(recipe):
    model = tiny_net().eval()
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"layer 'layer2.0.conv1': weight 'weight' holds 1 NaN and 0 Inf"):
        leanconv.convert(model, recipe, X[:1])


def test_an_infinite_bn_statistic_is_refused_on_the_command_line(tmp_path, capsys):
    sd = tiny_net().state_dict()
    sd["layer1.0.bn1.running_var"][3] = float("inf")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "inf.safetensors"))
    assert main([*CONVERT, "--checkpoint", str(tmp_path / "inf.safetensors"), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "layer 'layer1.0.bn1': buffer 'running_var' holds 0 NaN and 1 Inf")


# --------------------------------------------------------------------------- 7. one line for every mistake


def raises(**kw):
    """A factory that fails (``test_security:raises``)."""
    raise RuntimeError("weights not found on this machine")


def returns_dict(**kw):
    return {"model": None}


def scripted(**kw):
    return torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)))


@pytest.mark.parametrize("model, message", [
    (":x", "must look like"),
    (".foo:bar", "must look like"),
    ("test_security:raises", "test_security:raises() failed: RuntimeError: weights not found"),
    ("test_security:returns_dict", "returned a dict, not an nn.Module"),
    ("test_security:scripted", "returned a TorchScript module"),
])
def test_bad_model_specs_and_factories_are_one_line(tmp_path, capsys, model, message):
    assert main(["convert", "--model", model, "--input-size", "16", "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "o").exists()


def test_an_out_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(leanconv, "convert", lambda *a, **k: pytest.fail("converted before checking --out"))
    (tmp_path / "file").write_text("x")
    assert main([*CONVERT, "--out", str(tmp_path / "file")]) == 2
    _one_line(capsys, "is a file, not a directory")
    assert main([*CONVERT, "--out", str(tmp_path / "file" / "sub")]) == 2
    _one_line(capsys, "part of its path is a file")
    real_open = os.open

    def read_only(path, *a, **kw):
        if str(path).endswith(LOCK):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", read_only)
    assert main([*CONVERT, "--out", str(tmp_path / "ro")]) == 2
    _one_line(capsys, "Read-only file system; choose a writable directory")
    assert not (tmp_path / "ro").exists()  # the directory made for the job is removed with the failure


def test_export_with_the_wrong_channels_names_the_expected_shape(tmp_path, saved, capsys):
    assert main(["export", "--from", str(saved[0]), "--in-chans", "3", "--onnx", str(tmp_path / "m.onnx")]) == 2
    _one_line(capsys, "takes 1-channel images, input shape (B, 1, H, W)", "(1, 3, 16, 16)", "--in-chans 1")
    assert not (tmp_path / "m.onnx").exists()


def test_a_corrupt_image_is_named(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "data" / cls / "good.png")
    bad = tmp_path / "data" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rc = main(["convert", "--model", "torchvision:resnet18", "--model-arg", "num_classes=2", "--input-size", "16",
               "--include", "layer1.0.conv1", "--calibrate", f"imagefolder:{tmp_path / 'data'}", "--calib-images",
               "3", "--out", str(tmp_path / "o")])
    assert rc == 2
    _one_line(capsys, f"cannot read image {bad}", "remove or replace the file")


def test_a_corrupt_image_read_by_a_worker_process_is_still_one_line(tmp_path, capsys):
    from PIL import Image

    from leanconv.cli import _say
    from leanconv.data import image_folder

    (tmp_path / "a").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data = torch.utils.data.DataLoader(image_folder(tmp_path, 16), batch_size=2, num_workers=1)
    with pytest.raises(leanconv.DataError) as e:
        next(iter(data))
    _say("leanconv run", "error", e.value, debug=False)
    line = _one_line(capsys, "leanconv run: error: cannot read image", "zz.png")
    assert "Caught" not in line and "DataError:" not in line


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["convert", "--model", ":x", "--out", str(tmp_path / "o"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("leanconv convert: error: model spec")


# --------------------------------------------------------------------------- 8. smaller ones


@pytest.mark.parametrize("args, message", [
    (["--train-images", "0"], "argument --train-images: must be at least 1, got 0"),
    (["--eval-images", "-5"], "argument --eval-images: must be at least 1, got -5"),
    (["--epochs", "-1"], "argument --epochs: must be at least 0.0"),
    (["--batch-size", "two"], "expected a whole number, got 'two'"),
])
def test_bad_counts_are_refused_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", TEACHER, "--data", "fashion-mnist", *args, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    _one_line(capsys, message)
    assert not (tmp_path / "o").exists()


def test_run_config_refuses_zero_and_negative_counts(tmp_path):
    source = ModelSource(TEACHER)
    for field, value in (("train_images", 0), ("eval_images", -5), ("in_chans", 0)):
        with pytest.raises(ConfigError, match=field):
            RunConfig(source, leanconv.get_recipe("sic-m2"), "fashion-mnist", tmp_path, **{field: value})


def test_torchscript_is_refused():
    with pytest.raises(ModelError, match="TorchScript"):
        leanconv.convert(torch.jit.script(tiny_net().eval()), "sic-m2", X[:1])


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        model, plan = _convert()
        leanconv.save(model, plan, tmp_path / "m")
        for f in ("model.safetensors", "manifest.json", "plan.json"):
            assert stat.S_IMODE((tmp_path / "m" / f).stat().st_mode) == 0o640, f
        pytest.importorskip("onnx")
        from leanconv.export import export_onnx

        export_onnx(model, X, tmp_path / "m.onnx", check=False)
        assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o640
    finally:
        os.umask(old)
