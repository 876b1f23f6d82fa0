"""Target models (official-checkpoint-compatible DiT; adapters of diffusers' and official-layout modules to
the target protocol, :mod:`.protocol`; weight conversion to and from diffusers' layout) and FREE drafters."""
from .dit import DiT, DiT_models, create_model, find_model, load_state_dict_strict  # noqa: F401
from .drafter import FeatureDrafter, FrozenFeatureDrafter  # noqa: F401
from .diffusers_adapter import DiffusersDiTTarget  # noqa: F401
from .diffusers_convert import convert_diffusers_to_dit, convert_dit_to_diffusers  # noqa: F401
from .official_adapter import OfficialDiTTarget, as_target  # noqa: F401
from .protocol import FusableHead, HeadParameters, Target, follows_target_protocol  # noqa: F401
