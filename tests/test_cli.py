from test_recipe import TINY
from typer.testing import CliRunner

from torchslim.cli import app

runner = CliRunner()


def test_compress_runs_a_recipe_and_prints_tables(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.replace("OUT", str(tmp_path / "out")))
    result = runner.invoke(app, ["compress", str(recipe)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "before / after" in result.output and "compression ratio" in result.output
    assert (tmp_path / "out" / "tiny.tslim").is_file() and (tmp_path / "out" / "report.json").is_file()

    inspected = runner.invoke(app, ["inspect", str(tmp_path / "out" / "tiny.tslim")], env={"COLUMNS": "200"})
    assert inspected.exit_code == 0 and "fc1.weight" in inspected.output and "payload" in inspected.output


def test_bad_inputs_exit_2_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: lenet5}\nstepz: []\n")
    result = runner.invoke(app, ["compress", str(bad)])
    assert result.exit_code == 2 and "stepz: unknown key" in result.output
    junk = tmp_path / "junk.tslim"
    junk.write_bytes(b"\x80\x04not a model")
    result = runner.invoke(app, ["inspect", str(junk)])
    assert result.exit_code == 2 and "error:" in result.output


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "compress" in result.output and "inspect" in result.output


def test_tables_fall_back_to_a_list_when_narrow_or_piped(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.replace("OUT", str(tmp_path / "out")))
    narrow = runner.invoke(app, ["compress", str(recipe), "--quiet"], env={"COLUMNS": "40"})
    assert narrow.exit_code == 0, narrow.output
    assert "before / after" in narrow.output and "per tensor in the file" not in narrow.output  # --quiet
    assert "compression ratio" in narrow.output and "━" not in narrow.output  # no bars
    assert max(len(line) for line in narrow.output.splitlines() if "/" not in line) <= 40
    inspected = runner.invoke(app, ["inspect", str(tmp_path / "out" / "tiny.tslim")], env={"COLUMNS": "60"})
    assert inspected.exit_code == 0 and "  fc1.weight" in inspected.output
    assert all(len(line) <= 60 for line in inspected.output.splitlines() if "tiny.tslim" not in line)
