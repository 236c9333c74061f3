-- `luarocks --lua-version 5.4 make` from a checkout: builds with CMake and installs the
-- Lua module (pupsourcing, pupsourcing.cli, pupsourcing.core) and the host binary
-- `pupsourcing` into the rock tree. The C library and headers are not part of the rock
-- (PUP_INSTALL_DEVEL=OFF): C programs use `cmake --install` (README, "Install").
rockspec_format = "3.0"
package = "pupsourcing"
version = "scm-1"
source = {
  -- No public repository yet: `luarocks make` builds the checkout it runs in and never
  -- fetches this.
  url = "git+file://./pupsourcing-c",
}
description = {
  summary = "Event sourcing on PostgreSQL: event store and projection processor for Lua 5.4",
  detailed = [[
An append-only event store with optimistic concurrency and projections run in
transactional batches, partitioned by aggregate, with worker groups. A C core over libpq,
a Lua 5.4 module and a host binary that runs projection files.]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
  "argparse >= 0.7", -- the CLI (Debian: lua-argparse)
}
external_dependencies = {
  PQ = { header = "postgresql/libpq-fe.h" },
  YAJL = { header = "yajl/yajl_parse.h" },
  UUID = { header = "uuid/uuid.h" },
}
build = {
  type = "cmake",
  variables = {
    CMAKE_BUILD_TYPE = "Release",
    CMAKE_INSTALL_PREFIX = "$(PREFIX)",
    CMAKE_INSTALL_BINDIR = "bin",
    PUP_LUA_INSTALL_DIR = "$(LUADIR)",
    PUP_LIB_INSTALL_DIR = "$(LIBDIR)",
    PUP_INSTALL_DEVEL = "OFF",
    BUILD_TESTING = "OFF",
  },
}
