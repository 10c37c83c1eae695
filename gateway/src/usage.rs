//! Units measured from a response: headers, JSON body, SSE stream.
