# Reliability tests (issue 5), included from CMakeLists.txt after spec/tests.cmake.
# Every spec/reliability/*_spec.lua is one ctest test `reliability.<name>`, label
# "reliability", run by busted from the source directory like the Lua specs:
#   bash scripts/test.sh -L reliability
# They need DATABASE_URL (scripts/test.sh sets it); reliability.pg_restart starts and
# restarts a PostgreSQL server of its own (scripts/pg.sh on a free port in a temp dir).
# Figures go to ${CMAKE_BINARY_DIR}/reliability-figures.txt (PUP_REL_REPORT overrides);
# PUP_REL_EVENTS sets the size of the resources run (default 200000).

find_program(PUP_LUA54 NAMES lua5.4 REQUIRED)
find_program(PUP_BUSTED NAMES busted PATHS /usr/bin)

if(NOT DEFINED _pup_lua_env)
  set(_pup_rel_lua_path "${CMAKE_SOURCE_DIR}/lua/?.lua\\\\;${CMAKE_SOURCE_DIR}/lua/?/init.lua\\\\;\\\\;")
  set(_pup_rel_lua_cpath "${CMAKE_BINARY_DIR}/lib/?.so\\\\;\\\\;")
  set(_pup_lua_env
    "LUA_PATH=${_pup_rel_lua_path}"
    "LUA_CPATH=${_pup_rel_lua_cpath}"
    "PUP_BIN=$<TARGET_FILE:pupsourcing>"
    "PUP_SOURCE_DIR=${CMAKE_SOURCE_DIR}"
    "PUP_BINARY_DIR=${CMAKE_BINARY_DIR}")
endif()

# name -> timeout in seconds (each run alone takes well under half of it)
set(_pup_rel_tests
  concurrency 150
  faults 180
  pg_restart 150
  bad_input 150
  resources 300)

if(PUP_BUSTED)
  list(LENGTH _pup_rel_tests _n)
  math(EXPR _last "${_n} - 1")
  foreach(_i RANGE 0 ${_last} 2)
    math(EXPR _j "${_i} + 1")
    list(GET _pup_rel_tests ${_i} _name)
    list(GET _pup_rel_tests ${_j} _timeout)
    add_test(NAME reliability.${_name}
             COMMAND ${PUP_LUA54} ${PUP_BUSTED} --helper=spec/helpers.lua
                     --output=plainTerminal "spec/reliability/${_name}_spec.lua"
             WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
    set_tests_properties(reliability.${_name} PROPERTIES
      LABELS "reliability"
      TIMEOUT ${_timeout}
      ENVIRONMENT "${_pup_lua_env}")
  endforeach()
endif()
