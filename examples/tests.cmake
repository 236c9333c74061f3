# Example tests (label "examples"), included from CMakeLists.txt after enable_testing().
# Every examples/tests/<name>.sh drives examples/<name>/main.lua the way its README does,
# on a database of its own (ex_<name>, created on the server in DATABASE_URL), so they may
# run in parallel with each other and with the other suites:
#   ctest --test-dir build -L examples -j4
find_program(PUP_BASH NAMES bash)
find_program(PUP_PSQL NAMES psql)
if(NOT PUP_BASH OR NOT PUP_PSQL)
  message(WARNING "bash or psql not found: the example tests are not registered")
else()
  file(GLOB _pup_example_tests CONFIGURE_DEPENDS "${CMAKE_SOURCE_DIR}/examples/tests/*.sh")
  list(SORT _pup_example_tests)
  foreach(_test IN LISTS _pup_example_tests)
    get_filename_component(_name "${_test}" NAME_WE)
    if(_name MATCHES "^_")
      continue() # helpers
    endif()
    add_test(NAME examples.${_name} COMMAND ${PUP_BASH} ${_test}
             WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
    set_tests_properties(examples.${_name} PROPERTIES
      LABELS "examples"
      TIMEOUT 90
      ENVIRONMENT "PUP_BIN=$<TARGET_FILE:pupsourcing>;PUP_SOURCE_DIR=${CMAKE_SOURCE_DIR};PUP_EXAMPLE_C=$<TARGET_FILE:example_c>")
  endforeach()
endif()

# examples/c: the C program, linked to the C core alone (no Lua), run on a database of its
# own by examples/tests/c.sh (which also checks it is the program docs/c-api.md shows).
add_executable(example_c examples/c/main.c)
target_link_libraries(example_c PRIVATE pupsourcing::core)
set_target_properties(example_c PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/examples)
