import os

import pytest

import rapidquant
from rapidquant import _ext


def test_build_info_reports_backends():
    info = rapidquant.build_info()
    assert set(info) >= {"version", "with_cuda", "with_openmp", "cuda_archs"}
    assert info["version"] == rapidquant.__version__
    assert isinstance(info["with_cuda"], bool) and isinstance(info["with_openmp"], bool)
    if info["with_cuda"]:
        assert info["cuda_archs"], "a CUDA build must list its architectures"
        # SASS for each arch, PTX for the newest
        assert any(a.endswith("-virtual") for a in info["cuda_archs"]) or len(info["cuda_archs"]) >= 1


def test_tests_use_installed_package_not_source_tree():
    # tests/ must exercise what pip installed; the source tree has no compiled _C.
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(os.path.dirname(here), "python", "rapidquant")
    installed = os.path.dirname(os.path.abspath(rapidquant.__file__))
    if os.environ.get("RAPIDQUANT_EDITABLE") != "1":
        assert os.path.realpath(installed) != os.path.realpath(src)


def test_missing_cuda_backend_names_the_build_option(monkeypatch):
    monkeypatch.setattr(_ext._C, "with_cuda", False, raising=False)
    with pytest.raises(RuntimeError, match="RAPIDQUANT_ENABLE_CUDA=ON"):
        _ext.require_cuda("rapidquant::quantize_dequantize")


@pytest.mark.skipif(os.environ.get("RAPIDQUANT_EXPECT_CUDA") != "1", reason="CI sets this when nvcc exists")
def test_ci_build_has_cuda_kernels():
    assert rapidquant.build_info()["with_cuda"], "nvcc was present but the CUDA kernels were not built"
