"""What every layer needs: paths local or in cloud storage, host memory, the device mesh and sharding rules,
distributed start-up, config files.  Importing it imports no jax (the huge-page start-up runs before jax)."""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.runtime.config_file import load_config_file
    from recurrent_depth.runtime.distributed import initialize_distributed
    from recurrent_depth.runtime.host_memory import use_huge_pages
    from recurrent_depth.runtime.paths import as_path, is_url
    from recurrent_depth.runtime.sharding import DEFAULT_RULES, MESH_AXES, make_mesh
