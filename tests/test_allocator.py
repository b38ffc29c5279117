"""`megatron-vr1` runs under tcmalloc (megatron_vr1/allocator.py): set-up installs it, the command
re-executes itself once with it preloaded, and MEGATRON_VR1_TCMALLOC=0 turns that off."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, sys; from megatron_vr1.allocator import reexec_with_tcmalloc as r; r(); "
         "maps = open('/proc/self/maps').read(); "
         "print('tcmalloc' in maps, os.environ.get('LD_PRELOAD', ''), os.environ.get('MARK'), sys.argv[1:])")


def _probe(**env):
    e = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MEGATRON_VR1_TCMALLOC")}
    e.update(env, MARK="kept")
    r = subprocess.run([sys.executable, "-c", PROBE, "a", "b c"], capture_output=True, text=True, env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_setup_installed_tcmalloc():
    from megatron_vr1.allocator import tcmalloc_path

    assert tcmalloc_path(), "no tcmalloc library: `make setup` installs Debian's libgoogle-perftools4"


def test_reexec_preloads_tcmalloc_once_and_keeps_arguments():
    from megatron_vr1.allocator import tcmalloc_path

    out = _probe()
    assert out == f"True {tcmalloc_path()} kept ['a', 'b c']", out
    # an LD_PRELOAD already set is kept after tcmalloc
    out = _probe(LD_PRELOAD="/nonexistent/libx.so")
    assert out.startswith(f"True {tcmalloc_path()}:/nonexistent/libx.so kept"), out


def test_switch_off():
    assert _probe(MEGATRON_VR1_TCMALLOC="0") == "False  kept ['a', 'b c']"


def test_the_command_itself_runs_under_tcmalloc(tmp_path):
    """The console script: `megatron-vr1 config` prints the resolved recipe from a process that has
    tcmalloc mapped (checked through the process's own /proc maps via a sitecustomize probe)."""
    probe = tmp_path / "sitecustomize.py"
    probe.write_text("import atexit, os\n"
                     "atexit.register(lambda: open(os.environ['MAPS_OUT'], 'a').write(str('tcmalloc' in open('/proc/self/maps').read()) + '\\n'))\n")
    out = tmp_path / "maps.txt"
    e = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MEGATRON_VR1_TCMALLOC")}
    e.update(PYTHONPATH=f"{tmp_path}:{e.get('PYTHONPATH', '')}", MAPS_OUT=str(out))
    exe = os.path.join(os.path.dirname(sys.executable), "megatron-vr1")
    r = subprocess.run([exe, "config", "configs/tiny_cpu.yaml"], capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "run_dir" in r.stdout
    assert out.read_text().split() == ["True"]  # one process exit: the re-executed one, with tcmalloc


def test_device_mode_suspended_only_pops_the_cpu_mode():
    """The vLLM engine generates without the global device-mapping mode (platform.py): inside the
    block `device="cuda"` is no longer mapped, after it the mode is back; another mode on top is
    left alone."""
    import torch
    from torch.overrides import TorchFunctionMode, _get_current_function_mode

    from megatron_vr1 import platform

    if platform.on_cuda():
        return
    platform.setup()
    assert isinstance(_get_current_function_mode(), platform.cpu_device_mode)
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # mapped
    with platform.device_mode_suspended():
        assert _get_current_function_mode() is None or not isinstance(_get_current_function_mode(),
                                                                      platform.cpu_device_mode)
        assert torch.zeros(1).device.type == "cpu"
    assert isinstance(_get_current_function_mode(), platform.cpu_device_mode)

    class Other(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Other():
        with platform.device_mode_suspended():  # not ours on top: nothing popped
            assert isinstance(_get_current_function_mode(), Other)
            assert torch.zeros(1, device="cuda").device.type == "cpu"  # still mapped underneath
    assert isinstance(_get_current_function_mode(), platform.cpu_device_mode)
