"""DiLoCo's settings (ringtrain.train.rounds.DiLoCo): what is refused, and how fragments cut
the parameters."""

from __future__ import annotations

import pytest

from ringtrain.errors import ConfigError
from ringtrain.train.rounds import DiLoCo, _fragments


@pytest.mark.parametrize("settings,message", [
    ({"inner_steps": 10, "fragments": 3}, "fragments must be a positive divisor of inner_steps"),
    ({"inner_steps": 10, "fragments": 0}, "fragments must be a positive divisor"),
    ({"fragments": True}, "fragments must be a positive divisor"),
    ({"inner_steps": 10, "fragments": 2, "round_seconds": 2.0}, "fragments need lockstep"),
    ({"inner_steps": 10, "fragments": 2, "average_inner_state": True},
     "fragments need lockstep"),
    ({"inner_steps": 0}, "inner_steps must be a positive integer"),
])
def test_bad_settings_are_refused_naming_what_is_wrong(settings, message):
    with pytest.raises(ConfigError, match=message):
        DiLoCo(**settings)


def test_fragments_cover_the_parameters_once_in_nearly_equal_parts():
    parts = _fragments(10, 3)
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 10)]
    assert _fragments(7, 1) == [slice(0, 7)]
    assert "fragments=4" in DiLoCo(inner_steps=8, fragments=4).spec()
