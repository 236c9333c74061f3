/*
 * main.c -- the host binary: `pupsourcing SCRIPT.lua [args]` runs a script as lua5.4
 * would, with `require "pupsourcing"` available; any other first argument is a
 * subcommand of lua/pupsourcing/cli.lua (run, migrate, migrate-gen, status, reset).
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pup_lua.h"

/* The directory holding pupsourcing.lua: PUP_LUA_DIR, else the installed tree next to
 * this executable, else the source tree it was built from. */
static void lua_dir(char *out, size_t size) {
    const char *env = getenv("PUP_LUA_DIR");
    if (env && *env) {
        snprintf(out, size, "%s", env);
        return;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            char probe[PATH_MAX + 64];
            snprintf(probe, sizeof probe, "%s/../share/lua/5.4/pupsourcing.lua", exe);
            if (access(probe, R_OK) == 0) {
                probe[strlen(probe) - strlen("/pupsourcing.lua")] = '\0';
                snprintf(out, size, "%.*s", (int)(size - 1), probe);
                return;
            }
        }
    }
    snprintf(out, size, "%s", PUP_SOURCE_LUA_DIR);
}

/* Prepends dir/?.lua;dir/?/init.lua to package.path and preloads the C core. */
static void setup_paths(lua_State *L) {
    char dir[PATH_MAX];
    lua_dir(dir, sizeof dir);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 1);
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_pupsourcing_core);
    lua_setfield(L, -2, "pupsourcing.core");
    lua_pop(L, 2);
}

/* Loads and runs the script (or the CLI) with a traceback; returns the exit status. */
static int pmain(lua_State *L) {
    int argc = (int)lua_tointeger(L, 1);
    char **argv = (char **)lua_touserdata(L, 2);
    luaL_openlibs(L);
    setup_paths(L);
    int script = argc >= 2 && (strstr(argv[1], ".lua") || strchr(argv[1], '/'));
    /* arg as lua5.4 builds it: arg[0] is the script, negative indices the interpreter. */
    lua_createtable(L, argc, 2);
    int first = script ? 1 : 0;
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - first);
    }
    lua_setglobal(L, "arg");
    pup_error err;
    if (script) {
        if (luaL_loadfile(L, argv[1]) != LUA_OK) {
            fprintf(stderr, "pupsourcing: %s\n", lua_tostring(L, -1));
            lua_pushinteger(L, 1);
            return 1;
        }
        for (int i = 2; i < argc; i++) lua_pushstring(L, argv[i]);
        if (pup_lua_pcall(L, argc - 2, 0, &err) != LUA_OK) {
            fprintf(stderr, "pupsourcing: %s\n", err.message);
            lua_pushinteger(L, 1);
            return 1;
        }
        lua_pushinteger(L, 0);
        return 1;
    }
    lua_getglobal(L, "require");
    lua_pushliteral(L, "pupsourcing.cli");
    if (pup_lua_pcall(L, 1, 1, &err) != LUA_OK) {
        fprintf(stderr, "pupsourcing: %s\n", err.message);
        lua_pushinteger(L, 1);
        return 1;
    }
    lua_getfield(L, -1, "main");
    lua_getglobal(L, "arg");
    if (pup_lua_pcall(L, 1, 1, &err) != LUA_OK) {
        fprintf(stderr, "pupsourcing: %s\n", err.message);
        lua_pushinteger(L, 1);
        return 1;
    }
    lua_pushinteger(L, lua_isinteger(L, -1) ? lua_tointeger(L, -1) : 0);
    return 1;
}

int main(int argc, char **argv) {
    lua_State *L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "pupsourcing: cannot create the Lua state (out of memory)\n");
        return 1;
    }
    lua_pushcfunction(L, pmain);
    lua_pushinteger(L, argc);
    lua_pushlightuserdata(L, argv);
    int status = 1;
    if (lua_pcall(L, 2, 1, 0) == LUA_OK) status = (int)lua_tointeger(L, -1);
    else fprintf(stderr, "pupsourcing: %s\n", lua_tostring(L, -1));
    fflush(stdout);
    lua_close(L);
    return status;
}
