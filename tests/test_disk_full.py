"""A disk that fills up during export: a real 2 MB tmpfs, the real converter and quantizer."""

import pytest

from tutor_wrap.backends import llamacpp
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.backends.gguf_export import convert_model, export_model

pytestmark = pytest.mark.tools



def test_converter_running_out_of_disk_leaves_nothing_behind(tiny_model, small_disk, tmp_path):
    out = small_disk / "tiny-F16.gguf"   # the f16 GGUF is ~3.5 MB: it cannot fit in 2 MB
    with pytest.raises(TutorWrapError) as exc:
        convert_model(llamacpp.locate(), tiny_model, out, "f16", tmp_path / "export.log")
    assert "disk filled up" in str(exc.value) and "nothing was kept" in str(exc.value)
    assert list(small_disk.iterdir()) == []  # no final file, no .partial


def test_export_checks_free_disk_before_writing(tiny_model, small_disk, tmp_path):
    with pytest.raises(TutorWrapError) as exc:
        export_model(tiny_model, small_disk, "tiny", ["Q4_K_M"], "cpu", tmp_path / "export.log")
    assert "needs about" in str(exc.value) and "free" in str(exc.value)
    assert list(small_disk.iterdir()) == []
