"""Kernels and caches with one realistic bug each, and correct ones written differently.

Every wrong kernel (:mod:`.attention`) is a textbook attention with one line
changed the way kernel authors get it wrong, or (:mod:`.layouts`) a textbook
kernel on a layout kernels take (packed rows, pages, an in-op cache) with one
slip in reading it; every wrong cache
(:mod:`.caches`) a small cache as users write one, with one mistake. Each of
those bugs has been reported against some real library. Every wrong backward
(:mod:`.backward`) is a textbook backward with one step of its chain rule
changed the way backward kernels get it wrong. ``check_attention``,
``check_cache`` and ``check_attention_backward`` must fail every wrong one
and pass the correct ones, which is how a verdict is tried before it is
trusted; point the verifier at them to see what a failure report looks like::

    refattn verify --candidate refattn.testing.known_bugs.attention:causal_excludes_diagonal

:data:`WRONG_KERNELS` maps each wrong kernel's name to the kernel and the
dtypes its bug shows in, :data:`KERNEL_FEATURES` to the features its check
draws where those are not the defaults (its bug is in something a kernel need
not have by default); :data:`CORRECT_KERNELS`, :data:`WRONG_CACHES` and
:data:`CORRECT_CACHES` the others. The correct kernels take every option the
problem has: their checks draw :data:`EVERY_OPTION`. The backwards have the
same four: :data:`WRONG_BACKWARD_KERNELS`, :data:`BACKWARD_KERNEL_FEATURES`,
:data:`CORRECT_BACKWARD_KERNELS` and :data:`EVERY_BACKWARD_OPTION`.
"""

from refattn.testing.known_bugs import attention, backward, layouts
from refattn.testing.known_bugs.attention import EVERY_OPTION
from refattn.testing.known_bugs.backward import EVERY_BACKWARD_OPTION
from refattn.testing.known_bugs.caches import CORRECT_CACHES, WRONG_CACHES

WRONG_KERNELS = {**attention.WRONG, **layouts.WRONG}
KERNEL_FEATURES = {**attention.FEATURES, **layouts.FEATURES}
CORRECT_KERNELS = {**attention.CORRECT, **layouts.CORRECT}
WRONG_BACKWARD_KERNELS = backward.WRONG
BACKWARD_KERNEL_FEATURES = backward.FEATURES
CORRECT_BACKWARD_KERNELS = backward.CORRECT

__all__ = ["BACKWARD_KERNEL_FEATURES", "CORRECT_BACKWARD_KERNELS", "CORRECT_CACHES",
           "CORRECT_KERNELS", "EVERY_BACKWARD_OPTION", "EVERY_OPTION", "KERNEL_FEATURES",
           "WRONG_BACKWARD_KERNELS", "WRONG_CACHES", "WRONG_KERNELS"]  # fmt: skip
