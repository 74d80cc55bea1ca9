"""verl's plugin entry point (``verl.plugins``, declared in the package's metadata): verl imports it on
``import verl`` in every process, so installing the package is enough for
``actor_rollout_ref.actor.policy_loss.loss_mode=recap_vanilla`` (or any ``recap_*`` loss) and
``algorithm.adv_estimator=recap`` (RECAP's reward weights, ``recap_kernels.verl_recap``, and with
``+algorithm.recap.replay_data`` its replay in the actor workers, ``recap_kernels.verl_replay``) to
work in verl's processes. ``VERL_USE_EXTERNAL_PLUGINS=none`` turns verl's plugin loading off."""
from .verl import register
from .verl_recap import install

register()
install()
