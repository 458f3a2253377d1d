"""Compatibility shims between the optional env packages and the installed mujoco.

The package runs mujoco 4 (requirements.lock). Two optional packages predate it:

- dm-control 1.0.50 (the newest release) is built against mujoco 3.17: its table of MjModel/MjData
  array fields (`dm_control.mujoco.wrapper.mjbindings.sizes.array_sizes`) names a few flex
  (deformable-body) fields that mujoco 4 removed (`flex_vertedge`, `flexvert_J`, ...), and building
  any Physics fails with `AttributeError: 'MjModel' object has no attribute 'flex_vertedge'`.
  `patch_dm_control` drops from that table the fields the installed MjModel/MjData lack. The table
  only drives dm_control's named indexing (`physics.named.data.xpos['torso']`); no suite task
  reads a flex field, and the simulation itself is mujoco's.
- gymnasium-robotics 1.4.2's joint helpers (`gymnasium_robotics.utils.mujoco_utils`) test
  `joint_type in (mjJNT_HINGE, mjJNT_SLIDE)`, which is False in mujoco 4 (its enums no longer
  compare equal to numpy integers from the left), so every Fetch task fails at construction.
  `patch_gymnasium_robotics` replaces the four helpers with ones that compare integers.

Each patch is applied once, only where the installed versions need it (a no-op with a mujoco whose
fields and enums the package expects). tests/test_envs_families.py checks both families end to end.
"""

from __future__ import annotations

import numpy as np

_patched: set[str] = set()


def patch_dm_control() -> None:
    """Drop from dm_control's MjModel/MjData field table the fields the installed mujoco lacks."""
    if "dm_control" in _patched:
        return
    import mujoco
    from dm_control.mujoco.wrapper.mjbindings import sizes

    model = mujoco.MjModel.from_xml_string("<mujoco/>")
    for struct, obj in (("mjmodel", model), ("mjdata", mujoco.MjData(model))):
        table = sizes.array_sizes[struct]
        for field in [f for f in table if not hasattr(obj, f)]:
            del table[field]
    _patched.add("dm_control")


def _enums_compare_with_numpy() -> bool:
    import mujoco

    slide = mujoco.mjtJoint.mjJNT_SLIDE
    return bool(slide == np.int32(int(slide)))


def patch_gymnasium_robotics() -> None:
    """Make gymnasium_robotics.utils.mujoco_utils' joint helpers work with mujoco 4's enums."""
    if "gymnasium_robotics" in _patched:
        return
    if not _enums_compare_with_numpy():
        import mujoco
        from gymnasium_robotics.utils import mujoco_utils

        free, ball = int(mujoco.mjtJoint.mjJNT_FREE), int(mujoco.mjtJoint.mjJNT_BALL)
        qpos_dims, qvel_dims = {free: 7, ball: 4}, {free: 6, ball: 3}  # hinge and slide: 1

        def joint_slice(model, name: str, address: str, dims: dict[int, int]) -> slice:
            joint_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, name)
            assert joint_id != -1, f"Joint with name '{name}' is not part of the model!"
            start = int(getattr(model, address)[joint_id])
            return slice(start, start + dims.get(int(model.jnt_type[joint_id]), 1))

        def set_joint(model, data, name, value, field, address, dims):
            s = joint_slice(model, name, address, dims)
            value = np.array(value)
            if s.stop - s.start > 1:
                assert value.shape == (s.stop - s.start,), f"Value has incorrect shape {name}: {value}"
            getattr(data, field)[s] = value

        mujoco_utils.set_joint_qpos = lambda m, d, n, v: set_joint(m, d, n, v, "qpos", "jnt_qposadr", qpos_dims)
        mujoco_utils.set_joint_qvel = lambda m, d, n, v: set_joint(m, d, n, v, "qvel", "jnt_dofadr", qvel_dims)
        mujoco_utils.get_joint_qpos = lambda m, d, n: d.qpos[joint_slice(m, n, "jnt_qposadr", qpos_dims)].copy()
        mujoco_utils.get_joint_qvel = lambda m, d, n: d.qvel[joint_slice(m, n, "jnt_dofadr", qvel_dims)].copy()
    _patched.add("gymnasium_robotics")
