"""tools/benchmark_image_check.py on a few hundred images: every row measured, every image
passes, and the second run is answered by the cache without reading a header."""
import json

from tools import benchmark_image_check as bench


def test_benchmark_rows_on_a_small_dataset(tmp_path, capsys):
    output = tmp_path / "rows.json"
    assert bench.main(["--images", "300", "--repeats", "1", "--workers", "2",
                       "--dir", str(tmp_path / "data"), "--output", str(output)]) == 0
    rows = {(r["section"], r["run"]): r for r in json.loads(output.read_text())["rows"]}
    assert set(rows) == {
        ("headers", f"{kind}, {state}") for kind in ("1 process", "2 threads", "2 processes")
        for state in ("cold", "warm")} | {
        ("check_image_files", "first run (empty cache), cold"),
        ("check_image_files", "first run (empty cache), warm"),
        ("check_image_files", "second run (cache filled)")}
    assert rows["check_image_files", "first run (empty cache), warm"][
        "headers_read_per_run"] == 300
    assert rows["check_image_files", "second run (cache filled)"]["headers_read_per_run"] == 0
    assert all(r["seconds"] > 0 for r in rows.values())
    assert "| check_image_files | second run (cache filled) | 0 |" in capsys.readouterr().out
    # The dataset is kept in --dir and reused.
    assert len(list((tmp_path / "data" / "images").glob("*.png"))) == 150
