"""verl's plugin entry point (``verl.plugins``, declared in the package's metadata): verl imports it on
``import verl`` in every process, so installing the package is enough for
``actor_rollout_ref.actor.policy_loss.loss_mode=recap_vanilla`` (or any ``recap_*`` loss) to work in
verl's workers. ``VERL_USE_EXTERNAL_PLUGINS=none`` turns verl's plugin loading off."""
from .verl import register

register()
