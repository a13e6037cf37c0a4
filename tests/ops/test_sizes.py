import re

import numpy as np
import pytest
import torch

from hybridvision.ops.sizes import pair


def test_pair_accepts_ints_pairs_and_integer_scalars():
    assert pair(3) == (3, 3) and pair((3, 4)) == (3, 4) and pair([5, 2]) == (5, 2)
    assert pair(torch.Size([5, 6])) == (5, 6) and pair(np.int64(7)) == (7, 7)


@pytest.mark.parametrize("bad", [0, -1, (1, 2, 3), (2, 0), 2.5, (2.0, 3), "ab"])
def test_pair_rejects_with_the_name_and_value(bad):
    with pytest.raises(ValueError, match=r"grid must be a positive int .* got " + re.escape(repr(bad))):
        pair(bad, "grid")
