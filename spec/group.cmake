# Worker-group tests of issue 7 (label "group"). Include after spec/tests.cmake:
#   include(spec/group.cmake)
#
#   lua.group    spec/group_spec.lua, short cases (handover, fence): registered by tests.cmake
#   group.scale  1 -> 4 -> 2 -> 5 workers over 50,000 events, SIGTERM/SIGKILL/SIGSTOP
#   group.resize repartition 4 -> 7 mid-stream
#   group.netns  workers in network namespaces, one cut off (spec/group_netns.lua; needs
#                root: skipped with exit code 77 where namespaces are not permitted)
# Each is its own ctest test so each stays well below the timeout; they share the
# RESOURCE_LOCK pup_group (they start many processes: one at a time on small machines).
if(NOT DEFINED _pup_lua_env)
  message(FATAL_ERROR "spec/group.cmake must be included after spec/tests.cmake")
endif()

if(TEST lua.group)
  set_property(TEST lua.group APPEND PROPERTY ENVIRONMENT "PUP_GROUP_CASES=handover,fence")
  set_property(TEST lua.group APPEND PROPERTY LABELS group)
  set_property(TEST lua.group PROPERTY RESOURCE_LOCK pup_group)
endif()

if(PUP_BUSTED)
  foreach(_case scale resize)
    pup_add_spec(group.${_case} spec/group_spec.lua "lua;group" ${PUP_TEST_TIMEOUT} PUP_GROUP_CASES=${_case})
    set_tests_properties(group.${_case} PROPERTIES
      RESOURCE_LOCK pup_group
      RUN_SERIAL TRUE) # timing checks (handover within TTL) want the cores to themselves
  endforeach()
endif()

add_test(NAME group.netns COMMAND $<TARGET_FILE:pupsourcing> spec/group_netns.lua
         WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
set_tests_properties(group.netns PROPERTIES
  LABELS group
  TIMEOUT ${PUP_TEST_TIMEOUT}
  SKIP_RETURN_CODE 77
  RESOURCE_LOCK pup_group
  ENVIRONMENT "PUP_BIN=$<TARGET_FILE:pupsourcing>;PUP_SOURCE_DIR=${CMAKE_SOURCE_DIR};PUP_BINARY_DIR=${CMAKE_BINARY_DIR}")
