"""The ARM variants follow the emulated CPU's features (AT_HWCAP), and PLM_KERNELS forces one: run by
scripts/test-arm.sh under qemu-aarch64 with -cpu cortex-a53 (ARMv8.0), cortex-a76 (+dotprod) and max.
On this machine's own CPU, test_arm_kernels_under_emulation runs that script."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from kernelutil import REMOTE, kernels

ARM_CPU = os.environ.get("PLM_TEST_ARM_CPU")
EXPECTED = {"cortex-a53": ["ref", "neon"], "cortex-a76": ["ref", "neon", "dotprod"],
            "max": ["ref", "neon", "dotprod", "i8mm"]}
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (REMOTE and ARM_CPU), reason="runs under scripts/test-arm.sh (qemu-aarch64)")
def test_variants_follow_the_cpu():
    from remote import RemoteKernels

    assert kernels.available() == EXPECTED[ARM_CPU]
    assert kernels.best() == EXPECTED[ARM_CPU][-1]
    env = {k: v for k, v in os.environ.items() if k != "PLM_KERNELS"}
    for forced in EXPECTED[ARM_CPU]:  # PLM_KERNELS=<name> (pocketlm --kernels) picks any usable one
        other = RemoteKernels(REMOTE, env={**env, "PLM_KERNELS": forced})
        try:
            assert other.best() == forced
        finally:
            other.close()
    other = RemoteKernels(REMOTE, env={**env, "PLM_KERNELS": "avx512"})  # not usable: ignored
    try:
        assert other.best() == EXPECTED[ARM_CPU][-1]
    finally:
        other.close()


@pytest.mark.skipif(bool(REMOTE), reason="the script is run from this machine's own test run")
def test_arm_kernels_under_emulation():
    """scripts/test-arm.sh: the kernel tests against every ARM variant under qemu-aarch64, on three
    emulated CPUs (scripts/test.sh installs qemu-user-static and the aarch64 cross compiler)."""
    if not (shutil.which("qemu-aarch64-static") and shutil.which("aarch64-linux-gnu-g++")):
        if os.environ.get("CI"):  # CI runs as root, where scripts/test.sh installs them: never silently untested
            pytest.fail("qemu-user-static and g++-aarch64-linux-gnu are missing")
        pytest.skip("needs Debian's qemu-user-static and g++-aarch64-linux-gnu (scripts/test.sh installs them as root)")
    r = subprocess.run(["bash", str(REPO / "scripts" / "test-arm.sh"), "-x"], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert r.stdout.count(" passed") == 3 and " failed" not in r.stdout, r.stdout[-3000:]
