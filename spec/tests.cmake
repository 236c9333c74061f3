# Tests, included from CMakeLists.txt after enable_testing().
#   - every spec/*_spec.lua is one ctest test run by busted under lua5.4 (label "lua")
#   - every spec/c/test_*.c is a C program linked to the core (label "c")
# They all need DATABASE_URL (scripts/test.sh starts a throwaway server and sets it).
# Specs use their own table names, so `ctest -j` may run them in parallel.

find_program(PUP_LUA54 NAMES lua5.4 REQUIRED)
find_program(PUP_BUSTED NAMES busted PATHS /usr/bin)
if(NOT PUP_BUSTED)
  message(WARNING "busted not found: the Lua specs are not registered (run scripts/deps.sh)")
endif()

set(PUP_TEST_TIMEOUT 120 CACHE STRING "Timeout of one test, in seconds")

# ENVIRONMENT is a ;-list, so the ;s inside LUA_PATH/LUA_CPATH are escaped; the test
# generator unescapes once more, hence the doubled backslash (checked with CMake 3.25:
# the specs see LUA_PATH=<src>/lua/?.lua;<src>/lua/?/init.lua;;).
set(_pup_lua_path "${CMAKE_SOURCE_DIR}/lua/?.lua\\\\;${CMAKE_SOURCE_DIR}/lua/?/init.lua\\\\;\\\\;")
set(_pup_lua_cpath "${CMAKE_BINARY_DIR}/lib/?.so\\\\;\\\\;")
set(_pup_test_env
  "LUA_PATH=${_pup_lua_path}"
  "LUA_CPATH=${_pup_lua_cpath}"
  "PUP_BIN=$<TARGET_FILE:pupsourcing>"
  "PUP_SOURCE_DIR=${CMAKE_SOURCE_DIR}"
  "PUP_BINARY_DIR=${CMAKE_BINARY_DIR}")

# Under the sanitizers the module is loaded into an uninstrumented lua5.4, so the ASan
# runtime must be preloaded; leak checking is off there (the interpreter and busted exit
# without closing their states), but stays on for the C tests and the host binary.
set(_pup_lua_env ${_pup_test_env})
if(PUP_SANITIZE)
  execute_process(COMMAND ${CMAKE_C_COMPILER} -print-file-name=libasan.so
                  OUTPUT_VARIABLE _pup_libasan OUTPUT_STRIP_TRAILING_WHITESPACE)
  execute_process(COMMAND ${CMAKE_C_COMPILER} -print-file-name=libubsan.so
                  OUTPUT_VARIABLE _pup_libubsan OUTPUT_STRIP_TRAILING_WHITESPACE)
  get_filename_component(_pup_libasan "${_pup_libasan}" REALPATH)
  get_filename_component(_pup_libubsan "${_pup_libubsan}" REALPATH)
  list(APPEND _pup_lua_env
    "LD_PRELOAD=${_pup_libasan}:${_pup_libubsan}"
    "ASAN_OPTIONS=detect_leaks=0:abort_on_error=0"
    "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
endif()

# One busted spec file as one ctest test, run from the source directory:
#   pup_add_spec(<test name> <spec file> <labels> <timeout> [VAR=value ...])
function(pup_add_spec name file labels timeout)
  set(_env "${_pup_lua_env}") # quoted: keeps the escaped ;s of LUA_PATH
  if(ARGN)
    string(JOIN ";" _extra ${ARGN})
    string(APPEND _env ";${_extra}")
  endif()
  add_test(NAME ${name}
           COMMAND ${PUP_LUA54} ${PUP_BUSTED} --helper=spec/helpers.lua --output=plainTerminal ${file}
           WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  set_tests_properties(${name} PROPERTIES LABELS "${labels}" TIMEOUT ${timeout} ENVIRONMENT "${_env}")
endfunction()

if(PUP_BUSTED)
  file(GLOB _pup_specs CONFIGURE_DEPENDS "${CMAKE_SOURCE_DIR}/spec/*_spec.lua")
  list(SORT _pup_specs)
  foreach(_spec IN LISTS _pup_specs)
    get_filename_component(_name "${_spec}" NAME_WE)
    string(REGEX REPLACE "_spec$" "" _name "${_name}")
    pup_add_spec(lua.${_name} "spec/${_name}_spec.lua" lua ${PUP_TEST_TIMEOUT})
  endforeach()
  # Batch by batch through every offset and batch size: ~40 s alone, over 120 s at times
  # beside the rest of the suite on two cores.
  set_tests_properties(lua.hostile_readahead PROPERTIES TIMEOUT 360)
endif()

file(GLOB _pup_ctests CONFIGURE_DEPENDS "${CMAKE_SOURCE_DIR}/spec/c/test_*.c")
list(SORT _pup_ctests)
foreach(_src IN LISTS _pup_ctests)
  get_filename_component(_name "${_src}" NAME_WE)
  add_executable(${_name} ${_src})
  target_link_libraries(${_name} PRIVATE pupsourcing_core PkgConfig::LUA m dl)
  set_target_properties(${_name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/spec)
  add_test(NAME c.${_name} COMMAND ${_name} WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  # The plain run and the valgrind run of one C test use the same tables: never together.
  set_tests_properties(c.${_name} PROPERTIES
    LABELS "c"
    RESOURCE_LOCK ${_name}
    TIMEOUT ${PUP_TEST_TIMEOUT}
    ENVIRONMENT "${_pup_test_env}")
endforeach()

# The core tests once more under valgrind: no leaks, no invalid accesses (label "valgrind").
find_program(PUP_VALGRIND NAMES valgrind)
if(PUP_VALGRIND AND NOT PUP_SANITIZE)
  foreach(_src IN LISTS _pup_ctests)
    get_filename_component(_name "${_src}" NAME_WE)
    add_test(NAME valgrind.${_name}
             COMMAND ${PUP_VALGRIND} --quiet --leak-check=full --errors-for-leak-kinds=definite,indirect
                     --error-exitcode=9 $<TARGET_FILE:${_name}>
             WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
    set_tests_properties(valgrind.${_name} PROPERTIES
      LABELS "c;valgrind"
      RESOURCE_LOCK ${_name}
      TIMEOUT ${PUP_TEST_TIMEOUT}
      ENVIRONMENT "${_pup_test_env}")
  endforeach()
endif()

# luacheck over every Lua file of the project (configuration: .luacheckrc; label "lint").
find_program(PUP_LUACHECK NAMES luacheck)
if(PUP_LUACHECK)
  add_test(NAME lint.luacheck
           COMMAND ${PUP_LUACHECK} --no-color -q lua projections examples spec bench
           WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
  set_tests_properties(lint.luacheck PROPERTIES LABELS "lint" TIMEOUT ${PUP_TEST_TIMEOUT})
else()
  message(WARNING "luacheck not found: the lint test is not registered (run scripts/deps.sh)")
endif()
