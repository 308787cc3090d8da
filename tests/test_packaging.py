"""Packaging: what a pip user gets, and what the core costs to import.

* The core (``import dancegrpo``, its ops, coefficients, samplers and modules) needs torch and
  numpy only: every public op runs with the trainer's dependencies made unimportable, and none
  of them (nor Triton, nor CUDA) is loaded by it when they are installed.
* A wheel built from a copy of the tree (``pip wheel --no-build-isolation``, not editable),
  installed into a folder and used from another directory, ships its compiled extension,
  configs and base models, and trains from a shipped config; a wheel built without the
  extension makes ``python -m dancegrpo.env`` say so in a warning block.
"""

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dancegrpo"

# What the core must never import: the trainer's light dependencies and the heavy optional ones.
TRAINER_ONLY = ("yaml", "PIL", "safetensors", "tqdm", "diffusers", "transformers", "triton", "starlette", "uvicorn")

# Every public op, on every backend auto may pick on CPU, forward and backward where differentiable.
CORE_SCRIPT = r"""
import sys
blocked = sys.argv[1] == "blocked"
if blocked:  # as if they were not installed: importing any of them raises ImportError
    for name in TRAINER:
        sys.modules[name] = None
import torch
before = set(sys.modules)

import dancegrpo as dg
from dancegrpo import samplers

called = set()
g = torch.Generator().manual_seed(0)
B, shape = 4, (4, 3, 5, 6)
sig = dg.flow_schedule(8, shift=3.0); called.add("flow_schedule")
coeffs = [dg.flow_sde_coeffs(sig[2].expand(B), sig[3].expand(B), 0.7, variant=v)
          for v in ("dance", "flow_grpo", "cps")]; called.add("flow_sde_coeffs")
ab = torch.linspace(0.3, 0.9, B, dtype=torch.float64)
coeffs.append(dg.ddim_coeffs(ab, ab + 0.05, 1.0)); called.add("ddim_coeffs")
coeffs.append(dg.StepCoeffs(torch.full((B,), 0.9), torch.full((B,), -0.1), torch.full((B,), 0.3)))
called.add("StepCoeffs")
sampler = samplers.FlowSampler(num_steps=4, eta=0.7)
for backend in ("torch", "native", "auto"):
    for c in coeffs:
        v = torch.randn(shape, generator=g, dtype=torch.bfloat16).requires_grad_(True)
        x = torch.randn(shape, generator=g)
        y, logp0 = dg.sample_step(v.detach(), x, c, generator=g, backend=backend)
        y2, _ = dg.sample_step(v.detach(), x, c, noise=torch.randn(shape, generator=g), backend=backend)
        x_ode = dg.ode_step(v, x, c)
        ids = torch.tensor([1, 0, 1, 0])
        adv_ids = dg.group_advantages(torch.randn(B, generator=g), group_ids=ids, backend=backend)
        logp = dg.step_logprob(v, x, y, c, backend=backend)
        adv = dg.group_advantages(torch.randn(B, 2, generator=g), 2, weights=[0.5, 0.5], backend=backend)
        loss, _ = dg.clipped_ratio_loss(logp, logp0, adv, backend=backend)
        loss2, _ = dg.grpo_step_loss(v, x, y, c, logp0, adv, ref_model_output=v.detach() + 0.01, beta=0.1,
                                     backend=backend)
        loss3, _ = dg.GRPOStepLoss(beta=0.0, backend=backend)(v, x, y2, c, logp0, adv)
        loss4, _ = dg.nft_loss(v, v.detach() + 0.01, x, torch.rand(B, generator=g), torch.rand(B, generator=g),
                               backend=backend)
        (loss + loss2 + loss3 + loss4).backward()
        assert v.grad is not None and bool(torch.isfinite(v.grad).all()), backend
called |= {"ode_step", "sample_step", "step_logprob", "group_advantages", "clipped_ratio_loss", "grpo_step_loss",
           "GRPOStepLoss", "nft_loss"}

missing = sorted(n for n in dg.__all__ if callable(getattr(dg, n)) and n not in called)
assert not missing, f"public ops this script does not run yet: {missing}"
if not blocked:
    loaded = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in TRAINER)
    assert not loaded, f"the core imported {loaded}"
assert not torch.cuda.is_initialized(), "the core initialised CUDA"
print("core ok")
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DANCEGRPO_BACKEND", "DANCEGRPO_SKIP_EXT")}
    env.update(extra)
    return env


@pytest.mark.parametrize("mode", ["installed", "blocked"])
def test_core_needs_only_torch_and_numpy(mode):
    script = f"TRAINER = {TRAINER_ONLY!r}\n" + CORE_SCRIPT
    proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                          env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("core ok")


# --- a wheel, built and installed as a pip user would, used from another directory ----------

_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                 ".pytest_cache", ".benchmarks", ".ruff_cache", "runs", "outputs", "results")


def _pip(*args, env=None) -> str:
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-index"], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _build_and_install(tmp: Path, **env) -> tuple[Path, Path, str]:
    """A copy of the tree (so nothing is written into the checkout) -> wheel -> --target folder.

    Returns the wheel, the folder and the verbose build log (it shows every compiler command).
    """
    src, wheels, target = tmp / "src", tmp / "wheels", tmp / "site"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    log = _pip("wheel", "-v", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(src),
               env=_clean_env(**env))
    (wheel,) = wheels.glob("dancegrpo-*.whl")
    _pip("install", "-q", "--no-deps", "--target", str(target), str(wheel))
    return wheel, target, log


def _python(target: Path, cwd: Path, *args, strip_editable=False, **env) -> subprocess.CompletedProcess:
    """``python *args`` seeing the installed folder first, from a directory outside the checkout.

    ``strip_editable`` also drops setuptools' editable-install finders, which would otherwise
    supply submodules (``dancegrpo._C``) the installed folder lacks from the developer's clone.
    """
    if strip_editable:
        code = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path "
                "if not getattr(f, '__module__', '').startswith('__editable__')]; sys.argv = sys.argv[1:]; "
                "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
        args = ("-c", code, *args[1:]) if args[0] == "-m" else args
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=_clean_env(PYTHONPATH=str(target), **env))


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    wheel, target, log = _build_and_install(tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return wheel, target, elsewhere, log


@pytest.mark.slow
def test_extension_compiles_with_the_standard_torch_asks_for(wheel_install):
    """Newer torch headers refuse older standards: the build must not pin its own."""
    from torch.utils import cpp_extension

    wanted = set(re.findall(r"cpp_flag_prefix \+ '(c\+\+\d+)'", inspect.getsource(cpp_extension)))
    assert len(wanted) == 1, f"cannot read torch's default C++ standard from cpp_extension: {wanted}"
    compiles = [line for line in wheel_install[3].splitlines() if " -c " in line and ".cpp" in line]
    assert compiles, wheel_install[3][-3000:]
    used = [re.findall(r"-std=(c\+\+\d+)", line) for line in compiles]
    assert all(u == list(wanted) for u in used), sorted({tuple(u) for u in used})


@pytest.mark.slow
def test_wheel_ships_extension_configs_and_base_models(wheel_install):
    wheel = wheel_install[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(PACKAGE.parent).as_posix() for p in sorted(PACKAGE.glob("configs/*.yaml"))]
    shipped += [p.relative_to(PACKAGE.parent).as_posix() for p in sorted(PACKAGE.glob("assets/*/*"))]
    assert "dancegrpo/configs/shapes_t2i.yaml" in shipped and "dancegrpo/assets/shapes_t2i/model.safetensors" in shipped
    assert sorted(set(shipped) - names) == []
    assert [n for n in names if n.startswith("dancegrpo/_C.") and n.endswith(".so")], sorted(names)
    assert "dancegrpo/kernels/__init__.py" in names


@pytest.mark.slow
def test_installed_wheel_imports_its_own_extension(wheel_install):
    _, target, elsewhere, _ = wheel_install
    code = ("import json, dancegrpo, dancegrpo._C, dancegrpo.kernels;"
            "print(json.dumps([dancegrpo.__file__, dancegrpo._C.__file__, dancegrpo.kernels.__file__]))")
    proc = _python(target, elsewhere, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert Path(path).resolve().is_relative_to((target / "dancegrpo").resolve()), path


@pytest.mark.slow
def test_installed_wheel_env_shows_native_available(wheel_install):
    _, target, elsewhere, _ = wheel_install
    proc = _python(target, elsewhere, "-m", "dancegrpo.env")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.splitlines()[0].endswith(str(target / "dancegrpo")), out
    native = [line for line in out.splitlines() if line.strip().startswith("native ")]
    assert len(native) == 1 and native[0].split()[1] == "available", out
    assert "WARNING" not in out, out


@pytest.mark.slow
def test_installed_wheel_trains_a_shipped_config(wheel_install):
    _, target, elsewhere, _ = wheel_install
    out = elsewhere / "run"
    # the shipped base model, a few samples and sampler steps: seconds, on the compiled ops
    proc = _python(target, elsewhere, "-m", "dancegrpo", "train", "shapes_t2i", "max_steps=2",
                   f"output_dir={out}", "device=cpu", "log.progress=false", "rollout.prompts_per_step=2",
                   "rollout.group_size=2", "sampler.num_steps=4", "optim.train_batch_size=4",
                   "optim.gradient_accumulation_steps=1", "log.num_sample_prompts=2", "checkpoint_every=2",
                   DANCEGRPO_BACKEND="native")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


@pytest.mark.slow
def test_wheel_without_extension_says_so_loudly(tmp_path):
    _, target, _ = _build_and_install(tmp_path, DANCEGRPO_SKIP_EXT="1")
    assert not list((target / "dancegrpo").glob("_C.*"))
    proc = _python(target, tmp_path, "-m", "dancegrpo.env", strip_editable=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    native = [line for line in lines if line.strip().startswith("native ")]
    assert len(native) == 1 and native[0].split()[1] == "unavailable:", proc.stdout
    warning = lines[lines.index("WARNING: the native backend cannot run on cpu; `auto` takes the next backend above."):]
    assert any("dancegrpo._C is not importable" in line for line in warning), proc.stdout
    assert "  compiled extension there: none" in warning, proc.stdout
