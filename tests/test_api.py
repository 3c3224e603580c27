"""The package's public names resolve lazily to the real API functions."""

import rankopt


def test_every_public_name_resolves():
    for name in rankopt.__all__:
        assert getattr(rankopt, name) is not None


def test_jobs_are_the_cli_backends():
    from rankopt.api import train
    from rankopt.outputs.export import export
    from rankopt.search.tuner import tune

    assert rankopt.train is train and rankopt.tune is tune and rankopt.export is export
