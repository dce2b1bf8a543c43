<%@ page contentType="text/plain; charset=UTF-8" import="java.util.concurrent.atomic.AtomicInteger" %><%
    // The path Tomcat routes on (servlet path + path info: decoded, normalised, path parameters dropped), as
    // Spring MVC sees it behind a servlet container. /__seen answers how many other requests arrived.
    AtomicInteger seen;
    synchronized (application) {
        seen = (AtomicInteger) application.getAttribute("seen");
        if (seen == null) {
            seen = new AtomicInteger();
            application.setAttribute("seen", seen);
        }
    }
    String path = request.getServletPath() + (request.getPathInfo() == null ? "" : request.getPathInfo());
    if (path.equals("/__seen")) {
        out.print(seen.get());
    } else {
        seen.incrementAndGet();
        out.print(path + "\n" + request.getRequestURI() + "\n");
    }
%>
