# Reliability tests (issue 5), included from CMakeLists.txt after spec/tests.cmake.
# Every spec/reliability/*_spec.lua is one ctest test `reliability.<name>`, label
# "reliability", run by busted from the source directory like the Lua specs:
#   bash scripts/test.sh -L reliability
# They need DATABASE_URL (scripts/test.sh sets it); reliability.pg_restart starts and
# restarts a PostgreSQL server of its own (scripts/pg.sh on a free port in a temp dir).
# Figures go to ${CMAKE_BINARY_DIR}/reliability-figures.txt (PUP_REL_REPORT overrides);
# PUP_REL_EVENTS sets the size of the resources run (default 200000).

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
    pup_add_spec(reliability.${_name} "spec/reliability/${_name}_spec.lua" reliability ${_timeout})
  endforeach()
endif()
