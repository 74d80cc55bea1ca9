"""Imported by verl's ``actor_rollout_ref.model.external_lib=recap_kernels.verl_fused_linear``: puts
``recap_kernels.verl.FusedLinearForPPO`` in place of verl's in the importing process (see
``recap_kernels.verl.use_recap_fused_linear``)."""
from .verl import use_recap_fused_linear

use_recap_fused_linear()
