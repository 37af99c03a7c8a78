import pytest

from flwr_analytic.demo import main as core_main
from flwr_analytic.simulate import main as flower_main


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_readme_main_job_through_flower_equals_the_core_run(capsys):
    summary = flower_main([])
    out = capsys.readouterr().out
    assert "20 SuperNodes" in out and "personalized" in out
    core = core_main([])
    assert summary["num-nodes"] == 20
    assert summary["global-accuracy"] == pytest.approx(core["global_accuracy"], abs=1e-12)
    assert summary["personal-accuracy"] == pytest.approx(core["personalized_accuracy"], abs=1e-12)
    assert summary["personal-accuracy"] > summary["global-accuracy"]
    assert summary["bytes-received"] > 0
