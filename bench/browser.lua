-- Browser-like requests for wrk (bench/run.py --scenario browser): what a Firefox page
-- load sends through a CDN, about 450 bytes of header lines, some of which change on
-- every request as real clients' do: a Cookie (session and analytics ids) and an
-- X-Request-Id of its own, and a CF-IPCountry from a small mix of countries (FR and DE
-- resolve to a region of the bench config, the others fall through to the default).
-- The fixed lines are built once per thread; only the changing ones are formatted per
-- request.

local countries = { "FR", "DE", "GB", "US", "FR", "JP", "BR", "FR" }
local fixed
local n = 0

function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0))
  fixed = "Host: " .. wrk.headers["Host"] .. "\r\n"
    .. "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    .. "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
    .. "Accept-Language: en-US,en;q=0.5\r\n"
    .. "Accept-Encoding: gzip, deflate, br\r\n"
    .. "Connection: keep-alive\r\n"
    .. "Sec-Fetch-Dest: document\r\n"
end

function request()
  n = n + 1
  local r = math.random(0, 0x7fffffff)
  return "GET " .. wrk.path .. " HTTP/1.1\r\n" .. fixed
    .. string.format("Cookie: sid=%08x%08x; _ga=GA1.1.%d.%d; theme=dark\r\n", r, n, r, n)
    .. string.format("X-Request-Id: %08x-%04x-4%03x-8%03x-%012x\r\n",
                     r, n % 65536, r % 4096, n % 4096, n)
    .. "CF-IPCountry: " .. countries[n % #countries + 1] .. "\r\n\r\n"
end
