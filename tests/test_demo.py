from flwr_analytic.demo import main


def test_demo_trains_from_20_clients_and_personalization_helps(capsys):
    result = main(["--num-clients", "20", "--seed", "0"])
    out = capsys.readouterr().out
    assert "sample-weighted accuracy" in out and out.count("%") >= 40
    assert result["global_accuracy"] > 0.95
    assert result["personalized_accuracy"] > result["global_accuracy"]
    assert result["upload_floats"] > 0
